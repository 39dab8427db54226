//! Compaction: folding the closed months of a ledger into a checkpoint.
//!
//! See "Compaction" in the [`crate::ledger`] module docs for the rules. This module builds the
//! [`Checkpoint`] from a ledger's state, checks one read back from a log, and installs it.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use suanli_core::{Millis, PoolKind};

use super::{
    Bill, EntryKind, Hold, Ledger, LedgerEntry, LedgerTotals, Settlement, TenantAccount, corrupt,
};
use crate::charge::{LeaseId, charge_lease};
use crate::error::BillingError;
use crate::money::Fen;
use crate::month::Month;
use crate::statement::UsageLine;
use crate::voucher::{Voucher, VoucherId};

/// What one tenant's leases that ended in one closed month add up to: everything its statement
/// for that month, and the subsidy report, need of them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ClosedMonth {
    /// Leases that ended in the month.
    pub leases: u64,
    /// Usage by model and pool kind, in model then kind order, as the statement shows it.
    pub lines: Vec<UsageLine>,
    /// Charges before subsidy.
    pub cost: Fen,
    /// Paid by vouchers.
    pub subsidy: Fen,
    /// What each voucher paid towards these leases.
    pub voucher_use: BTreeMap<VoucherId, Fen>,
    /// What vouchers paid, per pool kind of the lease part.
    pub subsidy_by_pool_kind: BTreeMap<PoolKind, Fen>,
}

impl ClosedMonth {
    /// Folds one settled lease in, with the statement's arithmetic.
    fn add(&mut self, bill: &Bill) -> Result<(), BillingError> {
        self.leases += 1;
        self.cost = self.cost.checked_add(bill.charge, "statement cost")?;
        self.subsidy = self
            .subsidy
            .checked_add(bill.subsidy, "statement subsidy")?;
        let running = u128::from(bill.usage.running_ms());
        for (i, (part, charge)) in bill.usage.parts.iter().zip(&bill.parts).enumerate() {
            let key = (part.model.as_str(), part.pool_kind);
            let at = match self
                .lines
                .binary_search_by(|l| (l.model.as_str(), l.pool_kind).cmp(&key))
            {
                Ok(at) => at,
                Err(at) => {
                    let line = UsageLine::new(&part.model, part.pool_kind);
                    self.lines.insert(at, line);
                    at
                }
            };
            self.lines[at].add_part(part, charge.amount, bill.subsidy_of_part(i), running)?;
        }
        for share in &bill.vouchers {
            let used = self.voucher_use.entry(share.voucher.clone()).or_default();
            *used = used.checked_add(share.amount, "voucher used")?;
            // Every share names a part of its lease (checked when its debit was applied).
            let Some(kind) = bill
                .usage
                .parts
                .get(share.part as usize)
                .map(|p| p.pool_kind)
            else {
                continue;
            };
            let slot = self.subsidy_by_pool_kind.entry(kind).or_default();
            *slot = slot.checked_add(share.amount, "subsidy by pool kind")?;
        }
        Ok(())
    }

    /// Due for the month's leases: cost less subsidy.
    pub fn due(&self) -> Result<Fen, BillingError> {
        self.cost.checked_sub(self.subsidy, "statement due")
    }
}

/// An adjustment kept after its entry was folded into a checkpoint: statements list each one.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FoldedAdjustment {
    /// Sequence number of its original `Adjusted` entry.
    pub seq: u64,
    /// When it was made, unix ms.
    pub at: Millis,
    /// The tenant.
    pub tenant: String,
    /// Positive charges, negative credits.
    pub amount: Fen,
    /// Why.
    pub reason: String,
}

/// The closed months of a compacted ledger: per tenant and month what its settled leases add up
/// to, and every adjustment folded so far (they are few and statements list them one by one).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ClosedBooks {
    /// Months strictly before this one (China Standard Time) are closed.
    pub before: Month,
    /// Per tenant, per closed month.
    pub tenants: BTreeMap<String, BTreeMap<Month, ClosedMonth>>,
    /// Folded adjustments of every month, in sequence order.
    pub adjustments: Vec<FoldedAdjustment>,
}

/// The payload of an [`EntryKind::Compacted`] entry: the whole state of the ledger at the
/// entry, with the leases of closed months folded into [`ClosedBooks`]. The entry stands for
/// itself and every entry before it (sequence numbers `0..=seq`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The closed months.
    pub closed: ClosedBooks,
    /// Every voucher, by id, with what it has paid.
    pub vouchers: Vec<Voucher>,
    /// Every tenant's account.
    pub tenants: BTreeMap<String, TenantAccount>,
    /// Open holds.
    pub holds: BTreeMap<LeaseId, Hold>,
    /// The district's monthly subsidy budget.
    pub subsidy_budget_monthly: Option<Fen>,
    /// Sums over the whole ledger, closed months included.
    pub totals: LedgerTotals,
    /// Settlements of leases that ended in open months, by lease id.
    pub settlements: Vec<Settlement>,
}

/// The answer of [`Ledger::compact`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompactOutcome {
    /// Months strictly before this one are closed now; `None` for a ledger without entries,
    /// which has nothing to fold.
    pub closed_before: Option<Month>,
    /// Whether this call changed the ledger (false: those months were closed already, or the
    /// ledger has no entries).
    pub compacted: bool,
    /// Settled leases folded by this call.
    pub leases_folded: u64,
    /// Entries the checkpoint replaced (a previous checkpoint counts as one).
    pub entries_replaced: u64,
    /// Sequence number of the checkpoint entry, when one was made: that of the last entry it
    /// replaced.
    pub checkpoint_seq: Option<u64>,
}

impl Ledger {
    /// Folds every lease that ended in a month strictly before `before` (China Standard Time)
    /// into a per tenant and month summary, drops their settlements, and replaces all entries
    /// by one [`EntryKind::Compacted`] checkpoint entry numbered as the last of them (so
    /// `next_seq()` does not change). Every query (statements, the subsidy report, voucher
    /// balances, totals, budgets, tenant accounts) answers as before. Afterwards a lease that
    /// ended in a closed month can no longer be settled ([`BillingError::LeaseInClosedMonth`]).
    ///
    /// Compacting with a month at or before the one already closed, or a ledger without
    /// entries, changes nothing. `now` is when the checkpoint is recorded.
    pub fn compact(&mut self, before: Month, now: Millis) -> Result<CompactOutcome, BillingError> {
        let unchanged = |closed_before| CompactOutcome {
            closed_before,
            compacted: false,
            leases_folded: 0,
            entries_replaced: 0,
            checkpoint_seq: None,
        };
        let Some(last) = self.entries.last() else {
            return Ok(unchanged(None));
        };
        if let Some(closed) = &self.closed
            && before <= closed.before
        {
            return Ok(unchanged(Some(closed.before)));
        }
        let seq = last.seq;
        let settled = self.settlements.len();
        let replaced = self.entries.len() as u64;
        let checkpoint = self.checkpoint(before)?;
        let open = checkpoint.settlements.len();
        // One entry, checked (against this very state) before it changes anything.
        self.apply_checked(LedgerEntry {
            seq,
            at: now,
            kind: EntryKind::Compacted {
                checkpoint: Box::new(checkpoint),
            },
        })?;
        Ok(CompactOutcome {
            closed_before: Some(before),
            compacted: true,
            leases_folded: (settled - open) as u64,
            entries_replaced: replaced,
            checkpoint_seq: Some(seq),
        })
    }

    /// Months strictly before this one are closed (compacted), if any are.
    pub fn closed_before(&self) -> Option<Month> {
        self.closed.as_ref().map(|c| c.before)
    }

    /// The closed months' summaries, if the ledger was compacted.
    pub fn closed_books(&self) -> Option<&ClosedBooks> {
        self.closed.as_ref()
    }

    /// The checkpoint that compacting this ledger before `before` gives.
    pub(super) fn checkpoint(&self, before: Month) -> Result<Checkpoint, BillingError> {
        let mut closed = self.closed.clone().unwrap_or(ClosedBooks {
            before,
            tenants: BTreeMap::new(),
            adjustments: Vec::new(),
        });
        closed.before = before;
        // Adjustments are kept whatever their month: statements list them one by one.
        for entry in &self.entries {
            if let EntryKind::Adjusted {
                tenant,
                amount,
                reason,
            } = &entry.kind
            {
                closed.adjustments.push(FoldedAdjustment {
                    seq: entry.seq,
                    at: entry.at,
                    tenant: tenant.clone(),
                    amount: *amount,
                    reason: reason.clone(),
                });
            }
        }
        let mut open = Vec::new();
        for settlement in self.settlements.values() {
            let usage = &settlement.bill.usage;
            let month = Month::containing(usage.ended_at);
            if month >= before {
                open.push(settlement.clone());
                continue;
            }
            closed
                .tenants
                .entry(usage.tenant.clone())
                .or_default()
                .entry(month)
                .or_default()
                .add(&settlement.bill)?;
        }
        Ok(Checkpoint {
            closed,
            vouchers: self.vouchers.values().cloned().collect(),
            tenants: self.tenants.clone(),
            holds: self.holds.clone(),
            subsidy_budget_monthly: self.subsidy_budget_monthly,
            totals: self.totals,
            settlements: open,
        })
    }

    /// Applies a checkpoint entry: on an empty ledger (a log that starts with it) after checking
    /// it is consistent in itself; on a ledger with entries, only if it is exactly what
    /// compacting that ledger gives. Changes nothing when refused.
    pub(super) fn apply_checkpoint(
        &mut self,
        seq: u64,
        checkpoint: &Checkpoint,
    ) -> Result<(), BillingError> {
        if self.entries.is_empty() {
            validate(seq, checkpoint)?;
        } else {
            if let Some(closed) = &self.closed
                && checkpoint.closed.before <= closed.before
            {
                return Err(corrupt(
                    seq,
                    format!(
                        "checkpoint closes months before {}, already closed before {}",
                        checkpoint.closed.before, closed.before
                    ),
                ));
            }
            if &self.checkpoint(checkpoint.closed.before)? != checkpoint {
                return Err(corrupt(
                    seq,
                    "checkpoint does not match the entries before it".into(),
                ));
            }
        }
        self.install(checkpoint);
        Ok(())
    }

    /// Replaces the state by the checkpoint's (the caller then makes it the only entry).
    fn install(&mut self, checkpoint: &Checkpoint) {
        let mut vouchers: Vec<&Voucher> = checkpoint.vouchers.iter().collect();
        vouchers.sort_by_key(|v| v.issue_seq);
        self.vouchers_by_tenant.clear();
        for v in vouchers {
            self.vouchers_by_tenant
                .entry(v.spec.tenant.clone())
                .or_default()
                .push(v.spec.id.clone());
        }
        self.vouchers = checkpoint
            .vouchers
            .iter()
            .map(|v| (v.spec.id.clone(), v.clone()))
            .collect();
        self.settlements = checkpoint
            .settlements
            .iter()
            .map(|s| (s.bill.usage.lease.clone(), s.clone()))
            .collect();
        self.pending = None;
        self.tenants = checkpoint.tenants.clone();
        self.holds = checkpoint.holds.clone();
        self.subsidy_budget_monthly = checkpoint.subsidy_budget_monthly;
        self.totals = checkpoint.totals;
        self.closed = Some(checkpoint.closed.clone());
        // A new vector: `clear` would keep the replaced entries' capacity allocated.
        self.entries = Vec::new();
    }
}

/// Sums in `i128`, so that a check does not depend on the order amounts were added in.
fn sum(amounts: impl IntoIterator<Item = Fen>) -> i128 {
    amounts.into_iter().map(|a| i128::from(a.0)).sum()
}

/// Checks that a checkpoint read back from a log is one this crate could have written: every
/// running total agrees with the parts it sums, every settlement with its usage and vouchers.
fn validate(seq: u64, cp: &Checkpoint) -> Result<(), BillingError> {
    let bad = |reason: String| Err(corrupt(seq, format!("checkpoint: {reason}")));
    if seq == u64::MAX {
        return bad("no sequence number left after it".into());
    }
    let before = cp.closed.before;

    let mut vouchers: BTreeMap<&VoucherId, &Voucher> = BTreeMap::new();
    // Issue numbers order a tenant's vouchers, so each is one entry's.
    let mut issue_seqs = BTreeSet::new();
    for v in &cp.vouchers {
        v.spec.validate()?;
        if v.issue_seq > seq
            || !issue_seqs.insert(v.issue_seq)
            || v.used.is_negative()
            || v.used > v.spec.face_value
        {
            return bad(format!("voucher {} is inconsistent", v.spec.id));
        }
        if vouchers.insert(&v.spec.id, v).is_some() {
            return bad(format!("voucher {} listed twice", v.spec.id));
        }
    }
    let mut voucher_use: BTreeMap<&VoucherId, i128> = BTreeMap::new();
    // Per tenant and month: amounts due and adjustments, as `spent_by_month` counts them.
    let mut spending: BTreeMap<&str, BTreeMap<Month, i128>> = BTreeMap::new();
    let (mut charges, mut debits) = (0i128, 0i128);

    for (tenant, months) in &cp.closed.tenants {
        for (month, m) in months {
            if *month >= before || m.leases == 0 {
                return bad(format!("closed month {month} of {tenant} is inconsistent"));
            }
            let uses = sum(m.voucher_use.values().copied());
            if i128::from(m.cost.0) != sum(m.lines.iter().map(|l| l.cost))
                || i128::from(m.subsidy.0) != sum(m.lines.iter().map(|l| l.subsidy))
                || i128::from(m.subsidy.0) != uses
                || uses != sum(m.subsidy_by_pool_kind.values().copied())
                || m.subsidy > m.cost
                || m.lines.iter().any(|l| l.due.0 != l.cost.0 - l.subsidy.0)
            {
                return bad(format!("sums of closed month {month} of {tenant} disagree"));
            }
            for (id, amount) in &m.voucher_use {
                match vouchers.get(id) {
                    Some(v) if &v.spec.tenant == tenant && amount.is_positive() => {
                        *voucher_use.entry(id).or_default() += i128::from(amount.0);
                    }
                    _ => return bad(format!("voucher {id} did not pay for {tenant} in {month}")),
                }
            }
            charges += i128::from(m.cost.0);
            debits += i128::from(m.subsidy.0);
            *spending
                .entry(tenant)
                .or_default()
                .entry(*month)
                .or_default() += i128::from(m.cost.0) - i128::from(m.subsidy.0);
        }
    }

    let mut last_seq = None;
    let mut adjustments = 0i128;
    for a in &cp.closed.adjustments {
        if a.seq > seq
            || last_seq.is_some_and(|last| a.seq <= last)
            || a.tenant.is_empty()
            || a.reason.is_empty()
            || a.amount.0 == 0
        {
            return bad(format!("adjustment {} is inconsistent", a.seq));
        }
        last_seq = Some(a.seq);
        adjustments += i128::from(a.amount.0);
        *spending
            .entry(&a.tenant)
            .or_default()
            .entry(Month::containing(a.at))
            .or_default() += i128::from(a.amount.0);
    }

    let mut leases = BTreeSet::new();
    for s in &cp.settlements {
        check_settlement(seq, s, before, &vouchers)?;
        let bill = &s.bill;
        if !leases.insert(&bill.usage.lease) || cp.holds.contains_key(&bill.usage.lease) {
            return bad(format!(
                "lease {} settled twice or still held",
                bill.usage.lease
            ));
        }
        for share in &bill.vouchers {
            *voucher_use.entry(&share.voucher).or_default() += i128::from(share.amount.0);
        }
        charges += i128::from(bill.charge.0);
        debits += i128::from(bill.subsidy.0);
        *spending
            .entry(&bill.usage.tenant)
            .or_default()
            .entry(Month::containing(bill.usage.ended_at))
            .or_default() += i128::from(bill.tenant_due.0);
    }

    for v in &cp.vouchers {
        if i128::from(v.used.0) != voucher_use.get(&v.spec.id).copied().unwrap_or(0) {
            return bad(format!(
                "voucher {} used disagrees with its debits",
                v.spec.id
            ));
        }
    }
    let t = &cp.totals;
    if i128::from(t.charges.0) != charges
        || i128::from(t.voucher_debits.0) != debits
        || i128::from(t.tenant_dues.0) != charges - debits
        || i128::from(t.adjustments.0) != adjustments
        || i128::from(t.vouchers_issued.0) != sum(cp.vouchers.iter().map(|v| v.spec.face_value))
    {
        return bad("totals disagree with their parts".into());
    }

    let mut held: BTreeMap<&str, i128> = BTreeMap::new();
    for (lease, hold) in &cp.holds {
        if lease.0.is_empty() || hold.tenant.is_empty() || hold.amount.is_negative() {
            return bad(format!("hold of lease {lease} is inconsistent"));
        }
        *held.entry(&hold.tenant).or_default() += i128::from(hold.amount.0);
    }
    for (tenant, account) in &cp.tenants {
        if let Some(budget) = &account.budget {
            budget.validate()?;
        }
        let by_month: BTreeMap<Month, i128> = account
            .spent_by_month
            .iter()
            .map(|(m, a)| (*m, i128::from(a.0)))
            .collect();
        let expected = spending.remove(tenant.as_str()).unwrap_or_default();
        if tenant.is_empty()
            || by_month != expected
            || i128::from(account.spent_total.0) != by_month.values().sum::<i128>()
            || i128::from(account.held.0) != held.remove(tenant.as_str()).unwrap_or(0)
        {
            return bad(format!(
                "account of tenant {tenant} disagrees with its parts"
            ));
        }
    }
    if let Some(tenant) = spending.keys().chain(held.keys()).next() {
        return bad(format!("tenant {tenant} has no account"));
    }
    if let Some(monthly) = cp.subsidy_budget_monthly
        && monthly.is_negative()
    {
        return bad("negative subsidy budget".into());
    }
    Ok(())
}

/// Checks one open settlement of a checkpoint as replaying its batch would.
fn check_settlement(
    seq: u64,
    s: &Settlement,
    before: Month,
    vouchers: &BTreeMap<&VoucherId, &Voucher>,
) -> Result<(), BillingError> {
    let bill = &s.bill;
    let lease = &bill.usage.lease;
    let bad = |reason: &str| Err(corrupt(seq, format!("checkpoint: lease {lease}: {reason}")));
    if s.seq > seq || Month::containing(bill.usage.ended_at) < before {
        return bad("settled after the checkpoint or in a closed month");
    }
    let (parts, charge) = charge_lease(&bill.usage)?;
    if parts != bill.parts || charge != bill.charge {
        return bad("charge does not match its usage");
    }
    let mut per_part = vec![0i128; parts.len()];
    for share in &bill.vouchers {
        let Some(slot) = per_part.get_mut(share.part as usize) else {
            return bad("voucher share of a part it does not have");
        };
        *slot += i128::from(share.amount.0);
        match vouchers.get(&share.voucher) {
            Some(v) if v.spec.tenant == bill.usage.tenant && share.amount.is_positive() => {}
            _ => return bad("voucher share of an unknown or another tenant's voucher"),
        }
    }
    if per_part
        .iter()
        .zip(&parts)
        .any(|(paid, part)| *paid > i128::from(part.amount.0))
        || i128::from(bill.subsidy.0) != per_part.iter().sum::<i128>()
        || i128::from(bill.tenant_due.0) != i128::from(charge.0) - i128::from(bill.subsidy.0)
    {
        return bad("voucher shares and due disagree with the charge");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::tests::{march, spec, usage};
    use super::*;
    use crate::budget::Budget;
    use crate::ledger::LedgerEntry;
    use crate::statement::{SubsidyReport, TenantStatement, VoucherBalance};

    const HOUR: Millis = 3_600_000;
    const DAY: Millis = 24 * HOUR;

    fn feb() -> Millis {
        Month::new(2025, 2).unwrap().starts_at_ms() as Millis
    }

    fn month(text: &str) -> Month {
        text.parse().unwrap()
    }

    /// Leases in February and March for two tenants, vouchers paying in both, adjustments in
    /// both, a budget, the subsidy budget, a hold settled and one still open.
    fn two_month_ledger() -> Ledger {
        let (f, m) = (feb(), march());
        let mut ledger = Ledger::new();
        ledger
            .issue_voucher(spec("v1", "acme", 25_000, 5_000, f, m + 10 * DAY), f)
            .unwrap();
        ledger
            .issue_voucher(spec("v2", "globex", 1_000_000, 2_000, f, m + 90 * DAY), f)
            .unwrap();
        ledger
            .set_budget("acme", Some(Budget::monthly(Fen(1_000_000))), f)
            .unwrap();
        ledger.set_subsidy_budget(Some(Fen(40_000)), f).unwrap();
        ledger
            .place_hold(LeaseId::new("f1"), "acme", Fen(20_000), f)
            .unwrap();
        ledger
            .settle(usage("f1", "acme", f, f + 2 * HOUR), f + 2 * HOUR)
            .unwrap();
        ledger
            .settle(usage("f2", "globex", f, f + 3 * HOUR), f + 3 * HOUR)
            .unwrap();
        ledger
            .adjust("acme", Fen(-700), "february outage", f + 4 * HOUR)
            .unwrap();
        ledger
            .place_hold(LeaseId::new("m9"), "acme", Fen(5_000), m)
            .unwrap();
        // Ended in February, settled in March: still February's.
        ledger
            .settle(usage("f3", "acme", m - HOUR, m - 1), m + HOUR)
            .unwrap();
        ledger
            .settle(usage("m1", "acme", m, m + 4 * HOUR), m + 4 * HOUR)
            .unwrap();
        ledger
            .settle(usage("m2", "globex", m, m + HOUR), m + HOUR)
            .unwrap();
        ledger
            .adjust("globex", Fen(300), "march fee", m + 5 * HOUR)
            .unwrap();
        ledger
    }

    /// Everything a caller can ask, for comparing two ledgers.
    type Answers = (
        Vec<Result<TenantStatement, BillingError>>,
        Result<SubsidyReport, BillingError>,
        Vec<VoucherBalance>,
        LedgerTotals,
        Vec<Option<TenantAccount>>,
        Vec<Result<(), BillingError>>,
    );

    fn answers(ledger: &Ledger) -> Answers {
        let tenants = ["acme", "globex", "initech"];
        let months = ["2025-01", "2025-02", "2025-03", "2025-04"].map(month);
        let statements = tenants
            .iter()
            .flat_map(|t| months.iter().map(move |m| ledger.tenant_statement(t, *m)))
            .collect();
        let probes = tenants
            .iter()
            .flat_map(|t| {
                [feb(), march(), march() + 40 * DAY]
                    .into_iter()
                    .flat_map(move |at| {
                        [0, 9_999, 1_000_000].map(|amount| ledger.would_exceed(t, Fen(amount), at))
                    })
            })
            .collect();
        (
            statements,
            ledger.subsidy_report(months[0], months[3]),
            ledger.voucher_balances(None),
            ledger.totals(),
            tenants.iter().map(|t| ledger.tenant(t).cloned()).collect(),
            probes,
        )
    }

    #[test]
    fn compaction_keeps_every_answer_and_drops_the_closed_leases() {
        let mut ledger = two_month_ledger();
        let before = answers(&ledger);
        let next = ledger.next_seq();
        let outcome = ledger.compact(month("2025-03"), march() + DAY).unwrap();
        assert_eq!(
            outcome,
            CompactOutcome {
                closed_before: Some(month("2025-03")),
                compacted: true,
                leases_folded: 3,
                entries_replaced: next,
                checkpoint_seq: Some(next - 1),
            }
        );
        assert_eq!(answers(&ledger), before);
        // Only March's leases are still there, and one entry stands for all before it.
        let open: Vec<&str> = ledger
            .settlements()
            .map(|s| s.bill.usage.lease.0.as_str())
            .collect();
        assert_eq!(open, ["m1", "m2"]);
        assert!(ledger.settlement(&LeaseId::new("f1")).is_none());
        assert_eq!(ledger.entries().len(), 1);
        assert_eq!(ledger.entries()[0].seq, next - 1);
        assert_eq!(ledger.next_seq(), next);
        assert_eq!(ledger.closed_before(), Some(month("2025-03")));
        // The open hold survives and is still counted.
        assert_eq!(ledger.hold(&LeaseId::new("m9")).unwrap().amount, Fen(5_000));
        // The February statement still lists its adjustment and its vouchers' use.
        let s = ledger.tenant_statement("acme", month("2025-02")).unwrap();
        assert_eq!(s.leases, 2);
        assert_eq!(s.adjustments[0].reason, "february outage");
        assert_eq!(s.vouchers[0].used_in_month, Fen(15_000));
        assert!(s.summary_csv().contains("february outage"));
    }

    #[test]
    fn operations_after_compaction_answer_as_without_it() {
        let mut full = two_month_ledger();
        let mut compacted = full.clone();
        compacted.compact(month("2025-03"), march() + DAY).unwrap();
        let m = march();
        for ledger in [&mut full, &mut compacted] {
            ledger
                .issue_voucher(spec("v3", "acme", 50_000, 10_000, m, m + 60 * DAY), m + DAY)
                .unwrap();
            ledger
                .settle(usage("m9", "acme", m + DAY, m + DAY + HOUR), m + 2 * DAY)
                .unwrap();
            ledger
                .adjust("acme", Fen(100), "late february fix", feb() + DAY)
                .unwrap();
            ledger
                .place_hold(LeaseId::new("a1"), "globex", Fen(1), m + 2 * DAY)
                .unwrap();
        }
        assert_eq!(answers(&compacted), answers(&full));
        // A second compaction folds March too and the adjustment made meanwhile.
        full.compact(month("2025-04"), m + 40 * DAY).unwrap();
        compacted.compact(month("2025-04"), m + 40 * DAY).unwrap();
        assert_eq!(answers(&compacted), answers(&full));
        assert_eq!(compacted.settlements().count(), 0);
    }

    #[test]
    fn settling_into_a_closed_month_is_refused() {
        let mut ledger = two_month_ledger();
        ledger.compact(month("2025-03"), march() + DAY).unwrap();
        let unchanged = ledger.clone();
        let m = march();
        // A repeat of a folded settlement, and a new lease of the closed month alike.
        for (lease, start, end) in [("f1", feb(), feb() + 2 * HOUR), ("f7", m - 2 * HOUR, m - 1)] {
            let err = ledger
                .settle(usage(lease, "acme", start, end), m + 2 * DAY)
                .unwrap_err();
            assert_eq!(
                err,
                BillingError::LeaseInClosedMonth {
                    lease: LeaseId::new(lease),
                    month: month("2025-02"),
                    closed_before: month("2025-03"),
                }
            );
            assert!(err.to_string().contains("ended in 2025-02, a closed month"));
        }
        assert_eq!(ledger, unchanged);
        // Quotes still work, and open months settle and repeat as before.
        assert!(
            ledger
                .quote(&usage("f7", "acme", m - 2 * HOUR, m - 1))
                .is_ok()
        );
        let again = ledger
            .settle(usage("m1", "acme", m, m + 4 * HOUR), m + 2 * DAY)
            .unwrap();
        assert!(!again.newly_settled);
        let new = ledger
            .settle(usage("m3", "acme", m - 1, m), m + 2 * DAY)
            .unwrap();
        assert!(new.newly_settled);
        assert!(
            ledger
                .place_hold(LeaseId::new("m3"), "acme", Fen(1), m)
                .is_err()
        );
        // Replay re-checks it too: a charge of a closed month after the checkpoint is refused.
        let mut entries = unchanged.entries().to_vec();
        let (parts, total) = charge_lease(&usage("f7", "acme", m - 2 * HOUR, m - 1)).unwrap();
        entries.push(LedgerEntry {
            seq: unchanged.next_seq(),
            at: m + 2 * DAY,
            kind: EntryKind::LeaseCharged {
                usage: usage("f7", "acme", m - 2 * HOUR, m - 1),
                parts,
                total,
            },
        });
        assert!(matches!(
            Ledger::from_entries(entries),
            Err(BillingError::CorruptLedger { .. })
        ));
    }

    #[test]
    fn compacting_again_or_earlier_changes_nothing() {
        let mut ledger = two_month_ledger();
        ledger.compact(month("2025-03"), march() + DAY).unwrap();
        let once = ledger.clone();
        for earlier in ["2025-03", "2025-02", "1970-01"] {
            let outcome = ledger.compact(month(earlier), march() + 2 * DAY).unwrap();
            assert!(!outcome.compacted);
            assert_eq!(outcome.closed_before, Some(month("2025-03")));
            assert_eq!(outcome.checkpoint_seq, None);
            assert_eq!(ledger, once);
        }
        // A ledger without entries has nothing to fold.
        let mut empty = Ledger::new();
        let outcome = empty.compact(month("2025-03"), 0).unwrap();
        assert_eq!(outcome.closed_before, None);
        assert_eq!(empty, Ledger::new());
        // A ledger of one entry compacts to a checkpoint alone, which closes the months.
        let mut one = Ledger::new();
        one.set_subsidy_budget(None, 0).unwrap();
        one.compact(month("2025-03"), 0).unwrap();
        assert_eq!((one.entries().len(), one.next_seq()), (1, 1));
        assert!(matches!(
            one.settle(usage("r", "acme", feb(), feb() + HOUR), march()),
            Err(BillingError::LeaseInClosedMonth { .. })
        ));
    }

    #[test]
    fn a_compacted_ledger_replays_and_round_trips() {
        let full = two_month_ledger();
        let mut ledger = full.clone();
        ledger.compact(month("2025-03"), march() + DAY).unwrap();
        let m = march();
        ledger
            .settle(usage("m5", "globex", m, m + 2 * HOUR), m + 2 * DAY)
            .unwrap();
        let replayed = Ledger::from_entries(ledger.entries().to_vec()).unwrap();
        assert_eq!(replayed, ledger);
        let json = serde_json::to_string(&ledger).unwrap();
        let back: Ledger = serde_json::from_str(&json).unwrap();
        assert_eq!(back, ledger);
        assert_eq!(answers(&back), answers(&ledger));
        // Every entry before it, then the checkpoint and what followed, replays the same.
        let mut log = full.entries().to_vec();
        log.extend(ledger.entries().iter().cloned());
        assert_eq!(Ledger::from_entries(log).unwrap(), ledger);
        // Sequence numbers go on as without compaction.
        let checkpoint_seq = full.next_seq() - 1;
        assert_eq!(ledger.entries()[0].seq, checkpoint_seq);
        assert_eq!(ledger.entries_from(0), ledger.entries());
        assert_eq!(ledger.entries_from(checkpoint_seq), ledger.entries());
        assert_eq!(
            ledger.entries_from(checkpoint_seq + 1),
            &ledger.entries()[1..]
        );
        assert_eq!(
            ledger.entries_from(checkpoint_seq + 1)[0].seq,
            checkpoint_seq + 1
        );
        assert!(ledger.entries_from(u64::MAX).is_empty());
    }

    #[test]
    fn a_compacted_ledger_round_trips_through_postcard() {
        // The broker saves its snapshots in postcard.
        let mut ledger = two_month_ledger();
        ledger.compact(month("2025-03"), march() + DAY).unwrap();
        let bytes = postcard::to_stdvec(&ledger).unwrap();
        let back: Ledger = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, ledger);
    }

    #[test]
    fn old_entry_kinds_keep_their_serialised_form() {
        let entry = LedgerEntry {
            seq: 3,
            at: 5,
            kind: EntryKind::HoldReleased {
                lease: LeaseId::new("r1"),
            },
        };
        assert_eq!(
            serde_json::to_string(&entry).unwrap(),
            r#"{"seq":3,"at":5,"kind":{"hold_released":{"lease":"r1"}}}"#
        );
        let mut ledger = Ledger::new();
        ledger.set_subsidy_budget(None, 0).unwrap();
        ledger.compact(month("2025-03"), 7).unwrap();
        let json = serde_json::to_string(&ledger.entries()[0]).unwrap();
        assert!(
            json.starts_with(
                r#"{"seq":0,"at":7,"kind":{"compacted":{"checkpoint":{"closed":{"before":"2025-03""#
            ),
            "{json}"
        );
    }

    /// The checkpoint of a compacted ledger, to tamper with.
    fn checkpoint_entry() -> (Ledger, LedgerEntry) {
        let mut ledger = two_month_ledger();
        let full = ledger.clone();
        ledger.compact(month("2025-03"), march() + DAY).unwrap();
        (full, ledger.entries()[0].clone())
    }

    /// One way to damage a checkpoint.
    type Damage = Box<dyn FnOnce(&mut Checkpoint)>;

    fn tampered(change: impl FnOnce(&mut Checkpoint)) -> Result<Ledger, BillingError> {
        let (_, mut entry) = checkpoint_entry();
        if let EntryKind::Compacted { checkpoint } = &mut entry.kind {
            change(checkpoint);
        }
        Ledger::from_entries([entry])
    }

    #[test]
    fn replay_refuses_a_damaged_checkpoint() {
        assert!(tampered(|_| {}).is_ok());
        let damages: Vec<(&str, Damage)> = vec![
            ("totals", Box::new(|c| c.totals.charges.0 += 1)),
            ("voucher used", Box::new(|c| c.vouchers[0].used.0 += 1)),
            (
                "voucher order",
                Box::new(|c| c.vouchers[1].issue_seq = c.vouchers[0].issue_seq),
            ),
            (
                "closed cost",
                Box::new(|c| {
                    let m = c.closed.tenants.get_mut("acme").unwrap();
                    m.get_mut(&month("2025-02")).unwrap().cost.0 += 1;
                }),
            ),
            (
                "closed voucher use",
                Box::new(|c| {
                    let m = c.closed.tenants.get_mut("acme").unwrap();
                    let m = m.get_mut(&month("2025-02")).unwrap();
                    m.voucher_use.clear();
                }),
            ),
            (
                "closed month not closed",
                Box::new(|c| c.closed.before = month("2025-02")),
            ),
            (
                "open settlement charge",
                Box::new(|c| c.settlements[0].bill.charge.0 += 1),
            ),
            (
                "dropped settlement",
                Box::new(|c| {
                    c.settlements.pop();
                }),
            ),
            (
                "spending",
                Box::new(|c| c.tenants.get_mut("globex").unwrap().spent_total.0 += 1),
            ),
            (
                "held",
                Box::new(|c| {
                    c.holds.clear();
                }),
            ),
            (
                "adjustment",
                Box::new(|c| c.closed.adjustments[0].amount.0 -= 1),
            ),
            (
                "subsidy budget",
                Box::new(|c| c.subsidy_budget_monthly = Some(Fen(-1))),
            ),
        ];
        for (what, damage) in damages {
            assert!(
                matches!(tampered(damage), Err(BillingError::CorruptLedger { .. })),
                "{what}"
            );
        }
        // After entries, a checkpoint must be exactly what compacting them gives.
        let (full, mut entry) = checkpoint_entry();
        if let EntryKind::Compacted { checkpoint } = &mut entry.kind {
            checkpoint.holds.clear();
        }
        let mut log = full.entries().to_vec();
        log.push(entry.clone());
        assert!(matches!(
            Ledger::from_entries(log),
            Err(BillingError::CorruptLedger { .. })
        ));
        // Nor may it take a number other than the last entry's.
        let (full, mut entry) = checkpoint_entry();
        entry.seq += 1;
        let mut log = full.entries().to_vec();
        log.push(entry);
        assert!(matches!(
            Ledger::from_entries(log),
            Err(BillingError::CorruptLedger { .. })
        ));
        // A sequence number that leaves no room after it.
        let (_, mut entry) = checkpoint_entry();
        entry.seq = u64::MAX;
        assert!(Ledger::from_entries([entry]).is_err());
    }
}
