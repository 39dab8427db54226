//! Statements and reports, computed from the ledger, and their CSV renderings.
//!
//! - A lease belongs to the China Standard Time month in which it **ended**, whole: its charge,
//!   subsidy and P-hours are not split at a month boundary. An invoice then never changes after
//!   its month closed, except by leases that ended in it and are settled late, and an
//!   adjustment belongs to the month in which it was made.
//! - P-hours count actual running time (not the billed time rounded up to an increment): they
//!   measure compute delivered. They are exact integers of TFLOPS x ms internally and are shown
//!   in P-hours with three decimals, rounded half up.
//! - Statements scan the settlements; they are for reports, not for the hot path. Months a
//!   compaction closed are read from what it kept of them ([`crate::ClosedMonth`]), so they
//!   read the same as before.
//!
//! CSV: a header line, then one line per row, lines ending in `\n`; a field is quoted (with `"`
//! doubled) when it holds a comma, a quote, a line break or leading or trailing spaces; money in
//! yuan with two decimals (`1234.56`), times as unix ms.

use std::collections::BTreeMap;

use suanli_core::{Millis, PoolKind, TFLOPS_PER_P};

use crate::charge::{LeasePart, MS_PER_HOUR};
use crate::error::BillingError;
use crate::ledger::{EntryKind, Ledger};
use crate::money::{Fen, div_round_half_up};
use crate::month::Month;
use crate::voucher::VoucherId;

/// Most months one subsidy report covers (a century): a bound on the work a request can ask for.
pub const MAX_REPORT_MONTHS: i64 = 1200;

/// Every pool kind, in report order.
pub const POOL_KINDS: [PoolKind; 3] = [
    PoolKind::LocalCentre,
    PoolKind::LocalCloud,
    PoolKind::External,
];

/// Usage and money of one accelerator model in one kind of pool, in one month.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct UsageLine {
    /// Accelerator model id.
    pub model: String,
    /// Kind of pool.
    pub pool_kind: PoolKind,
    /// Lease parts counted (a lease spanning two pools counts in both lines).
    pub lease_parts: u64,
    /// Delivered compute in TFLOPS x ms of running time.
    pub tflops_ms: u128,
    /// Charge before subsidy.
    pub cost: Fen,
    /// Paid by vouchers.
    pub subsidy: Fen,
    /// Paid by the tenant: cost less subsidy.
    pub due: Fen,
}

impl UsageLine {
    /// An empty line of one model in one kind of pool.
    pub(crate) fn new(model: &str, pool_kind: PoolKind) -> UsageLine {
        UsageLine {
            model: model.to_string(),
            pool_kind,
            lease_parts: 0,
            tflops_ms: 0,
            cost: Fen::ZERO,
            subsidy: Fen::ZERO,
            due: Fen::ZERO,
        }
    }

    /// Adds one lease part that ran `running_ms`: its charge and what vouchers paid of it.
    /// Statements and the summaries of closed months add parts with this one arithmetic.
    pub(crate) fn add_part(
        &mut self,
        part: &LeasePart,
        charge: Fen,
        subsidy: Fen,
        running_ms: u128,
    ) -> Result<(), BillingError> {
        self.lease_parts += 1;
        self.tflops_ms = self
            .tflops_ms
            .saturating_add(u128::from(part.tflops) * running_ms);
        self.cost = self.cost.checked_add(charge, "statement cost")?;
        self.subsidy = self.subsidy.checked_add(subsidy, "statement subsidy")?;
        self.due = self.cost.checked_sub(self.subsidy, "statement due")?;
        Ok(())
    }

    /// Delivered compute in thousandths of a P-hour, rounded half up.
    pub fn milli_p_hours(&self) -> u128 {
        milli_p_hours(self.tflops_ms)
    }

    /// Delivered compute in P-hours with three decimals, e.g. `12.345`.
    pub fn p_hours(&self) -> String {
        let m = self.milli_p_hours();
        format!("{}.{:03}", m / 1000, m % 1000)
    }
}

/// Thousandths of a P-hour in `tflops_ms`: TFLOPS x ms / (1000 TFLOPS/P x 3 600 000 ms/h)
/// x 1000.
fn milli_p_hours(tflops_ms: u128) -> u128 {
    let per_milli_p_hour = u128::from(TFLOPS_PER_P) * u128::from(MS_PER_HOUR) / 1000;
    div_round_half_up(tflops_ms, per_milli_p_hour).unwrap_or(u128::MAX)
}

/// One voucher of a tenant in a monthly statement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VoucherLine {
    /// The voucher.
    pub voucher: VoucherId,
    /// Subsidy rate in basis points.
    pub rate_bp: u32,
    /// Its scope, as [`crate::VoucherScope::label`] writes it.
    pub scope: String,
    /// Start of validity, unix ms.
    pub valid_from: Millis,
    /// End of validity (exclusive), unix ms.
    pub valid_until: Millis,
    /// Face value issued.
    pub issued: Fen,
    /// Paid towards leases that ended this month.
    pub used_in_month: Fen,
    /// Paid towards leases that ended up to the end of this month.
    pub used_to_month_end: Fen,
    /// Left at the end of this month: issued less used to month end.
    pub remaining: Fen,
}

/// An adjustment in a monthly statement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdjustmentLine {
    /// Its ledger sequence number.
    pub seq: u64,
    /// When it was made, unix ms.
    pub at: Millis,
    /// Positive charges, negative credits.
    pub amount: Fen,
    /// Why.
    pub reason: String,
}

/// What one tenant used, cost and owes in one month.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantStatement {
    /// The tenant.
    pub tenant: String,
    /// The month (China Standard Time).
    pub month: Month,
    /// Leases that ended in the month.
    pub leases: u64,
    /// Usage by model and pool kind, in model then kind order.
    pub lines: Vec<UsageLine>,
    /// The tenant's vouchers issued by the end of the month and not expired before it began.
    pub vouchers: Vec<VoucherLine>,
    /// Adjustments made in the month.
    pub adjustments: Vec<AdjustmentLine>,
    /// Charges before subsidy.
    pub cost: Fen,
    /// Paid by vouchers.
    pub subsidy: Fen,
    /// Due for leases: cost less subsidy.
    pub due: Fen,
    /// Sum of adjustments.
    pub adjustments_total: Fen,
    /// What the tenant pays for the month: due plus adjustments.
    pub payable: Fen,
}

/// A voucher's balance now, for `suanli vouchers`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VoucherBalance {
    /// The voucher.
    pub voucher: VoucherId,
    /// Its tenant.
    pub tenant: String,
    /// Subsidy rate in basis points.
    pub rate_bp: u32,
    /// Cap per lease.
    pub per_lease_cap: Option<Fen>,
    /// Its scope label.
    pub scope: String,
    /// Start of validity, unix ms.
    pub valid_from: Millis,
    /// End of validity (exclusive), unix ms.
    pub valid_until: Millis,
    /// When it was issued, unix ms.
    pub issued_at: Millis,
    /// Face value.
    pub issued: Fen,
    /// Paid so far.
    pub used: Fen,
    /// Left.
    pub remaining: Fen,
}

/// The district's subsidy spending in one month.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubsidyMonth {
    /// The month.
    pub month: Month,
    /// Subsidy paid towards leases that ended this month, per pool kind (every kind present).
    pub by_pool_kind: BTreeMap<PoolKind, Fen>,
    /// Sum over pool kinds.
    pub spent: Fen,
    /// Face value of vouchers issued in the month.
    pub issued: Fen,
    /// The monthly subsidy budget, if set.
    pub budget: Option<Fen>,
    /// Budget less spent; negative when over budget.
    pub remaining: Option<Fen>,
}

/// The operator's report: subsidy spent per month and pool kind against the subsidy budget.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubsidyReport {
    /// One row per month of the range, in order.
    pub months: Vec<SubsidyMonth>,
}

impl Ledger {
    /// The statement of one tenant for one month.
    pub fn tenant_statement(
        &self,
        tenant: &str,
        month: Month,
    ) -> Result<TenantStatement, BillingError> {
        let next_month_start = month.next().starts_at_ms();
        let month_start = month.starts_at_ms();
        let mut lines: BTreeMap<(String, PoolKind), UsageLine> = BTreeMap::new();
        let mut used: BTreeMap<&VoucherId, (Fen, Fen)> = BTreeMap::new();
        let mut leases = 0;
        let (mut cost, mut subsidy) = (Fen::ZERO, Fen::ZERO);
        // Closed months start the sums with what compaction kept of them.
        let closed = self.closed_books();
        let closed_months = closed.and_then(|c| c.tenants.get(tenant));
        for (&m, summary) in closed_months.into_iter().flat_map(|ms| ms.range(..=month)) {
            let in_month = m == month;
            for (voucher, &amount) in &summary.voucher_use {
                let entry = used.entry(voucher).or_default();
                entry.1 = entry.1.checked_add(amount, "voucher used")?;
                if in_month {
                    entry.0 = entry.0.checked_add(amount, "voucher used")?;
                }
            }
            if in_month {
                leases += summary.leases;
                cost = cost.checked_add(summary.cost, "statement cost")?;
                subsidy = subsidy.checked_add(summary.subsidy, "statement subsidy")?;
                for line in &summary.lines {
                    lines.insert((line.model.clone(), line.pool_kind), line.clone());
                }
            }
        }
        for settlement in self.settlements() {
            let bill = &settlement.bill;
            if bill.usage.tenant != tenant || i128::from(bill.usage.ended_at) >= next_month_start {
                continue;
            }
            let in_month = Month::containing(bill.usage.ended_at) == month;
            for share in &bill.vouchers {
                let entry = used.entry(&share.voucher).or_default();
                entry.1 = entry.1.checked_add(share.amount, "voucher used")?;
                if in_month {
                    entry.0 = entry.0.checked_add(share.amount, "voucher used")?;
                }
            }
            if !in_month {
                continue;
            }
            leases += 1;
            cost = cost.checked_add(bill.charge, "statement cost")?;
            subsidy = subsidy.checked_add(bill.subsidy, "statement subsidy")?;
            let running = u128::from(bill.usage.running_ms());
            for (i, (part, charge)) in bill.usage.parts.iter().zip(&bill.parts).enumerate() {
                lines
                    .entry((part.model.clone(), part.pool_kind))
                    .or_insert_with(|| UsageLine::new(&part.model, part.pool_kind))
                    .add_part(part, charge.amount, bill.subsidy_of_part(i), running)?;
            }
        }
        let mut vouchers = Vec::new();
        for v in self.vouchers_of(tenant) {
            let (used_in_month, used_to_month_end) =
                used.get(&v.spec.id).copied().unwrap_or_default();
            let issued_by_end = i128::from(v.issued_at) < next_month_start;
            let alive_in_month = i128::from(v.spec.valid_until) > month_start;
            if !issued_by_end || !(alive_in_month || used_in_month.is_positive()) {
                continue;
            }
            vouchers.push(VoucherLine {
                voucher: v.spec.id.clone(),
                rate_bp: v.spec.rate_bp,
                scope: v.spec.scope.label(),
                valid_from: v.spec.valid_from,
                valid_until: v.spec.valid_until,
                issued: v.spec.face_value,
                used_in_month,
                used_to_month_end,
                remaining: v
                    .spec
                    .face_value
                    .checked_sub(used_to_month_end, "voucher remaining")?,
            });
        }
        let mut adjustments = Vec::new();
        let mut adjustments_total = Fen::ZERO;
        let folded = closed.into_iter().flat_map(|c| &c.adjustments);
        for a in folded.filter(|a| a.tenant == tenant && month.contains(a.at)) {
            adjustments_total = adjustments_total.checked_add(a.amount, "adjustments")?;
            adjustments.push(AdjustmentLine {
                seq: a.seq,
                at: a.at,
                amount: a.amount,
                reason: a.reason.clone(),
            });
        }
        for entry in self.entries() {
            if let EntryKind::Adjusted {
                tenant: t,
                amount,
                reason,
            } = &entry.kind
                && t == tenant
                && month.contains(entry.at)
            {
                adjustments_total = adjustments_total.checked_add(*amount, "adjustments")?;
                adjustments.push(AdjustmentLine {
                    seq: entry.seq,
                    at: entry.at,
                    amount: *amount,
                    reason: reason.clone(),
                });
            }
        }
        let due = cost.checked_sub(subsidy, "statement due")?;
        Ok(TenantStatement {
            tenant: tenant.to_string(),
            month,
            leases,
            lines: lines.into_values().collect(),
            vouchers,
            adjustments,
            cost,
            subsidy,
            due,
            adjustments_total,
            payable: due.checked_add(adjustments_total, "payable")?,
        })
    }

    /// Every voucher's balance now, of one tenant or of all, by id.
    pub fn voucher_balances(&self, tenant: Option<&str>) -> Vec<VoucherBalance> {
        self.vouchers()
            .filter(|v| tenant.is_none_or(|t| v.spec.tenant == t))
            .map(|v| VoucherBalance {
                voucher: v.spec.id.clone(),
                tenant: v.spec.tenant.clone(),
                rate_bp: v.spec.rate_bp,
                per_lease_cap: v.spec.per_lease_cap,
                scope: v.spec.scope.label(),
                valid_from: v.spec.valid_from,
                valid_until: v.spec.valid_until,
                issued_at: v.issued_at,
                issued: v.spec.face_value,
                used: v.used,
                remaining: v.remaining(),
            })
            .collect()
    }

    /// Subsidy spent per month (by the month leases ended) and pool kind, from `first` to
    /// `last` inclusive, against the monthly subsidy budget as it stands now.
    pub fn subsidy_report(&self, first: Month, last: Month) -> Result<SubsidyReport, BillingError> {
        let span = last.index() - first.index();
        if span >= MAX_REPORT_MONTHS {
            return Err(BillingError::ReportTooLong {
                first,
                last,
                max_months: MAX_REPORT_MONTHS,
            });
        }
        let mut months: BTreeMap<Month, SubsidyMonth> = BTreeMap::new();
        let budget = self.subsidy_budget_monthly();
        let mut month = first;
        while month <= last {
            months.insert(
                month,
                SubsidyMonth {
                    month,
                    by_pool_kind: POOL_KINDS.iter().map(|&k| (k, Fen::ZERO)).collect(),
                    spent: Fen::ZERO,
                    issued: Fen::ZERO,
                    budget,
                    remaining: budget,
                },
            );
            month = month.next();
        }
        // Closed months add what compaction kept of them (`range` needs `first <= last`).
        let closed = self
            .closed_books()
            .into_iter()
            .flat_map(|c| c.tenants.values());
        let in_range = closed.filter(|_| first <= last);
        for (m, summary) in in_range.flat_map(|by_month| by_month.range(first..=last)) {
            let Some(row) = months.get_mut(m) else {
                continue;
            };
            for (&kind, &amount) in &summary.subsidy_by_pool_kind {
                let slot = row.by_pool_kind.entry(kind).or_default();
                *slot = slot.checked_add(amount, "subsidy by pool kind")?;
                row.spent = row.spent.checked_add(amount, "subsidy spent")?;
            }
        }
        for settlement in self.settlements() {
            let bill = &settlement.bill;
            let Some(row) = months.get_mut(&Month::containing(bill.usage.ended_at)) else {
                continue;
            };
            for share in &bill.vouchers {
                let kind = bill.usage.parts[share.part as usize].pool_kind;
                let slot = row.by_pool_kind.entry(kind).or_default();
                *slot = slot.checked_add(share.amount, "subsidy by pool kind")?;
                row.spent = row.spent.checked_add(share.amount, "subsidy spent")?;
            }
        }
        for v in self.vouchers() {
            if let Some(row) = months.get_mut(&Month::containing(v.issued_at)) {
                row.issued = row
                    .issued
                    .checked_add(v.spec.face_value, "vouchers issued")?;
            }
        }
        for row in months.values_mut() {
            if let Some(budget) = row.budget {
                row.remaining = Some(budget.checked_sub(row.spent, "subsidy budget remaining")?);
            }
        }
        Ok(SubsidyReport {
            months: months.into_values().collect(),
        })
    }
}

/// One CSV field, quoted when it must be.
fn csv_field(text: &str) -> String {
    let needs_quotes =
        text.contains([',', '"', '\n', '\r']) || text.starts_with(' ') || text.ends_with(' ');
    if needs_quotes {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

fn csv_row(out: &mut String, fields: &[String]) {
    let line: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
    out.push_str(&line.join(","));
    out.push('\n');
}

fn header(out: &mut String, names: &[&str]) {
    csv_row(
        out,
        &names.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
    );
}

fn optional_fen(amount: Option<Fen>) -> String {
    amount.map(Fen::yuan_decimal).unwrap_or_default()
}

impl TenantStatement {
    /// The statement's usage lines as CSV, one row per model and pool kind.
    pub fn usage_csv(&self) -> String {
        let mut out = String::new();
        header(
            &mut out,
            &[
                "tenant",
                "month",
                "model",
                "pool_kind",
                "lease_parts",
                "p_hours",
                "cost_cny",
                "subsidy_cny",
                "due_cny",
            ],
        );
        for line in &self.lines {
            csv_row(
                &mut out,
                &[
                    self.tenant.clone(),
                    self.month.to_string(),
                    line.model.clone(),
                    line.pool_kind.as_str().to_string(),
                    line.lease_parts.to_string(),
                    line.p_hours(),
                    line.cost.yuan_decimal(),
                    line.subsidy.yuan_decimal(),
                    line.due.yuan_decimal(),
                ],
            );
        }
        out
    }

    /// The statement's vouchers as CSV.
    pub fn vouchers_csv(&self) -> String {
        let mut out = String::new();
        header(
            &mut out,
            &[
                "tenant",
                "month",
                "voucher",
                "rate_bp",
                "scope",
                "valid_from_ms",
                "valid_until_ms",
                "issued_cny",
                "used_in_month_cny",
                "used_to_month_end_cny",
                "remaining_cny",
            ],
        );
        for v in &self.vouchers {
            csv_row(
                &mut out,
                &[
                    self.tenant.clone(),
                    self.month.to_string(),
                    v.voucher.0.clone(),
                    v.rate_bp.to_string(),
                    v.scope.clone(),
                    v.valid_from.to_string(),
                    v.valid_until.to_string(),
                    v.issued.yuan_decimal(),
                    v.used_in_month.yuan_decimal(),
                    v.used_to_month_end.yuan_decimal(),
                    v.remaining.yuan_decimal(),
                ],
            );
        }
        out
    }

    /// The statement's totals and adjustments as CSV: one `total` row, then one row per
    /// adjustment.
    pub fn summary_csv(&self) -> String {
        let mut out = String::new();
        header(
            &mut out,
            &[
                "tenant",
                "month",
                "row",
                "leases",
                "cost_cny",
                "subsidy_cny",
                "due_cny",
                "adjustments_cny",
                "payable_cny",
                "reason",
            ],
        );
        csv_row(
            &mut out,
            &[
                self.tenant.clone(),
                self.month.to_string(),
                "total".into(),
                self.leases.to_string(),
                self.cost.yuan_decimal(),
                self.subsidy.yuan_decimal(),
                self.due.yuan_decimal(),
                self.adjustments_total.yuan_decimal(),
                self.payable.yuan_decimal(),
                String::new(),
            ],
        );
        for a in &self.adjustments {
            csv_row(
                &mut out,
                &[
                    self.tenant.clone(),
                    self.month.to_string(),
                    format!("adjustment {}", a.seq),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                    a.amount.yuan_decimal(),
                    String::new(),
                    a.reason.clone(),
                ],
            );
        }
        out
    }
}

/// Voucher balances as CSV.
pub fn voucher_balances_csv(balances: &[VoucherBalance]) -> String {
    let mut out = String::new();
    header(
        &mut out,
        &[
            "voucher",
            "tenant",
            "rate_bp",
            "per_lease_cap_cny",
            "scope",
            "valid_from_ms",
            "valid_until_ms",
            "issued_at_ms",
            "issued_cny",
            "used_cny",
            "remaining_cny",
        ],
    );
    for b in balances {
        csv_row(
            &mut out,
            &[
                b.voucher.0.clone(),
                b.tenant.clone(),
                b.rate_bp.to_string(),
                optional_fen(b.per_lease_cap),
                b.scope.clone(),
                b.valid_from.to_string(),
                b.valid_until.to_string(),
                b.issued_at.to_string(),
                b.issued.yuan_decimal(),
                b.used.yuan_decimal(),
                b.remaining.yuan_decimal(),
            ],
        );
    }
    out
}

impl SubsidyReport {
    /// The report as CSV, one row per month.
    pub fn to_csv(&self) -> String {
        let mut out = String::new();
        let mut names = vec!["month".to_string()];
        names.extend(POOL_KINDS.iter().map(|k| format!("{}_cny", k.as_str())));
        names.extend(
            ["spent_cny", "issued_cny", "budget_cny", "remaining_cny"]
                .iter()
                .map(|s| s.to_string()),
        );
        csv_row(&mut out, &names);
        for row in &self.months {
            let mut fields = vec![row.month.to_string()];
            fields.extend(POOL_KINDS.iter().map(|k| {
                row.by_pool_kind
                    .get(k)
                    .copied()
                    .unwrap_or_default()
                    .yuan_decimal()
            }));
            fields.push(row.spent.yuan_decimal());
            fields.push(row.issued.yuan_decimal());
            fields.push(optional_fen(row.budget));
            fields.push(optional_fen(row.remaining));
            csv_row(&mut out, &fields);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::charge::{LeaseId, LeasePart, LeaseUsage};
    use crate::voucher::{VoucherScope, VoucherSpec};

    const HOUR: Millis = 3_600_000;

    fn month(text: &str) -> Month {
        text.parse().unwrap()
    }

    fn start_of(text: &str) -> Millis {
        month(text).starts_at_ms() as Millis
    }

    fn part(pool: &str, kind: PoolKind, model: &str, tflops: u64) -> LeasePart {
        LeasePart {
            pool: pool.into(),
            pool_kind: kind,
            model: model.into(),
            devices: 1,
            tflops,
            price_per_device_hour: Fen(10_000),
            billing_increment_ms: None,
        }
    }

    fn usage(lease: &str, start: Millis, end: Millis, parts: Vec<LeasePart>) -> LeaseUsage {
        LeaseUsage {
            lease: LeaseId::new(lease),
            tenant: "acme".into(),
            started_at: start,
            ended_at: end,
            parts,
        }
    }

    /// acme has a 50% voucher on local pools; leases around the end of March (CST).
    fn ledger() -> Ledger {
        let april = start_of("2025-04");
        let mut ledger = Ledger::new();
        ledger
            .issue_voucher(
                VoucherSpec {
                    id: VoucherId::new("FT-1"),
                    tenant: "acme".into(),
                    face_value: Fen(1_000_000),
                    rate_bp: 5_000,
                    per_lease_cap: None,
                    scope: VoucherScope::local_pools(),
                    valid_from: 0,
                    valid_until: april + 30 * 24 * HOUR,
                },
                start_of("2025-03"),
            )
            .unwrap();
        ledger.set_subsidy_budget(Some(Fen(6_000)), 0).unwrap();
        let local = || part("futian-aicc", PoolKind::LocalCentre, "ascend-910b", 376);
        let external = || part("guiyang-1", PoolKind::External, "h20", 148);
        // Ends one ms before April in Beijing: March. Two hours, local and external parts.
        ledger
            .settle(
                usage(
                    "r1",
                    april - 2 * HOUR - 1,
                    april - 1,
                    vec![local(), external()],
                ),
                april,
            )
            .unwrap();
        // Starts in March, ends exactly at the first ms of April in Beijing, which is
        // 2025-03-31T16:00Z, still March in UTC: wholly April.
        ledger
            .settle(usage("r2", april - HOUR, april, vec![local()]), april)
            .unwrap();
        // Ends an hour before April: March.
        ledger
            .settle(
                usage("r3", april - 2 * HOUR, april - HOUR, vec![local()]),
                april,
            )
            .unwrap();
        ledger
            .adjust("acme", Fen(-250), "credit, \"outage\" on 3/30", april - 1)
            .unwrap();
        ledger
    }

    #[test]
    fn a_lease_belongs_to_the_month_it_ended_in_beijing_time() {
        let ledger = ledger();
        let march = ledger.tenant_statement("acme", month("2025-03")).unwrap();
        let april = ledger.tenant_statement("acme", month("2025-04")).unwrap();
        assert_eq!((march.leases, april.leases), (2, 1));
        // March: r1 (¥200 local + ¥200 external) and r3 (¥100 local); half the local part paid.
        assert_eq!(march.cost, Fen(50_000));
        assert_eq!(march.subsidy, Fen(15_000));
        assert_eq!(march.due, Fen(35_000));
        assert_eq!(march.adjustments_total, Fen(-250));
        assert_eq!(march.payable, Fen(34_750));
        assert_eq!(april.cost, Fen(10_000));
        assert_eq!(april.subsidy, Fen(5_000));
        assert!(april.adjustments.is_empty());
        // The lines, by model then pool kind.
        let lines: Vec<_> = march
            .lines
            .iter()
            .map(|l| {
                (
                    l.model.as_str(),
                    l.pool_kind,
                    l.lease_parts,
                    l.p_hours(),
                    l.cost.0,
                    l.subsidy.0,
                    l.due.0,
                )
            })
            .collect();
        assert_eq!(
            lines,
            vec![
                (
                    "ascend-910b",
                    PoolKind::LocalCentre,
                    2,
                    "1.128".to_string(),
                    30_000,
                    15_000,
                    15_000
                ),
                (
                    "h20",
                    PoolKind::External,
                    1,
                    "0.296".to_string(),
                    20_000,
                    0,
                    20_000
                ),
            ]
        );
    }

    #[test]
    fn voucher_lines_show_use_in_and_up_to_the_month() {
        let ledger = ledger();
        let march = ledger.tenant_statement("acme", month("2025-03")).unwrap();
        let april = ledger.tenant_statement("acme", month("2025-04")).unwrap();
        let v = &march.vouchers[0];
        assert_eq!(
            (v.issued, v.used_in_month, v.used_to_month_end, v.remaining),
            (Fen(1_000_000), Fen(15_000), Fen(15_000), Fen(985_000))
        );
        let v = &april.vouchers[0];
        assert_eq!(
            (v.used_in_month, v.used_to_month_end, v.remaining),
            (Fen(5_000), Fen(20_000), Fen(980_000))
        );
        // Not yet issued in February; expired before June began.
        assert!(
            ledger
                .tenant_statement("acme", month("2025-02"))
                .unwrap()
                .vouchers
                .is_empty()
        );
        assert!(
            ledger
                .tenant_statement("acme", month("2025-06"))
                .unwrap()
                .vouchers
                .is_empty()
        );
        // Balances now.
        let balances = ledger.voucher_balances(Some("acme"));
        assert_eq!(
            (balances[0].used, balances[0].remaining),
            (Fen(20_000), Fen(980_000))
        );
        assert!(ledger.voucher_balances(Some("globex")).is_empty());
        assert_eq!(ledger.voucher_balances(None).len(), 1);
    }

    #[test]
    fn subsidy_report_by_month_and_pool_kind_against_budget() {
        let ledger = ledger();
        let report = ledger
            .subsidy_report(month("2025-02"), month("2025-04"))
            .unwrap();
        let rows: Vec<_> = report
            .months
            .iter()
            .map(|r| {
                (
                    r.month.to_string(),
                    r.by_pool_kind[&PoolKind::LocalCentre].0,
                    r.by_pool_kind[&PoolKind::External].0,
                    r.spent.0,
                    r.issued.0,
                    r.remaining.map(|f| f.0),
                )
            })
            .collect();
        assert_eq!(
            rows,
            vec![
                ("2025-02".to_string(), 0, 0, 0, 0, Some(6_000)),
                (
                    "2025-03".to_string(),
                    15_000,
                    0,
                    15_000,
                    1_000_000,
                    Some(-9_000)
                ),
                ("2025-04".to_string(), 5_000, 0, 5_000, 0, Some(1_000)),
            ]
        );
        assert_eq!(
            report.to_csv(),
            "month,local_centre_cny,local_cloud_cny,external_cny,spent_cny,issued_cny,budget_cny,remaining_cny\n\
             2025-02,0.00,0.00,0.00,0.00,0.00,60.00,60.00\n\
             2025-03,150.00,0.00,0.00,150.00,10000.00,60.00,-90.00\n\
             2025-04,50.00,0.00,0.00,50.00,0.00,60.00,10.00\n"
        );
        assert!(
            ledger
                .subsidy_report(month("2025-05"), month("2025-04"))
                .unwrap()
                .months
                .is_empty()
        );
        let century = ledger.subsidy_report(month("1970-01"), month("2069-12"));
        assert_eq!(century.unwrap().months.len(), 1200);
        assert!(matches!(
            ledger.subsidy_report(month("1970-01"), month("2070-01")),
            Err(BillingError::ReportTooLong { .. })
        ));
    }

    #[test]
    fn statement_csv() {
        let march = ledger().tenant_statement("acme", month("2025-03")).unwrap();
        assert_eq!(
            march.usage_csv(),
            "tenant,month,model,pool_kind,lease_parts,p_hours,cost_cny,subsidy_cny,due_cny\n\
             acme,2025-03,ascend-910b,local_centre,2,1.128,300.00,150.00,150.00\n\
             acme,2025-03,h20,external,1,0.296,200.00,0.00,200.00\n"
        );
        let summary = march.summary_csv();
        let lines: Vec<&str> = summary.lines().collect();
        assert_eq!(
            lines[1],
            "acme,2025-03,total,2,500.00,150.00,350.00,-2.50,347.50,"
        );
        assert!(
            lines[2].ends_with(",-2.50,,\"credit, \"\"outage\"\" on 3/30\""),
            "{}",
            lines[2]
        );
        let vouchers = march.vouchers_csv();
        assert!(
            vouchers
                .lines()
                .nth(1)
                .unwrap()
                .starts_with("acme,2025-03,FT-1,5000,kinds:local_centre;local_cloud,0,")
        );
        let balances = voucher_balances_csv(&ledger().voucher_balances(None));
        assert!(
            balances
                .lines()
                .nth(1)
                .unwrap()
                .ends_with(",10000.00,200.00,9800.00")
        );
    }

    #[test]
    fn csv_fields_are_quoted_when_they_must_be() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("two\nlines"), "\"two\nlines\"");
        assert_eq!(csv_field(" padded"), "\" padded\"");
        assert_eq!(csv_field(""), "");
        assert_eq!(csv_field("深圳福田"), "深圳福田");
    }

    #[test]
    fn p_hours_have_three_decimals_rounded_half_up() {
        // 1000 TFLOPS for one hour is one P-hour.
        let one = u128::from(TFLOPS_PER_P) * u128::from(MS_PER_HOUR);
        assert_eq!(milli_p_hours(one), 1000);
        // Half a thousandth rounds up, less rounds down.
        assert_eq!(milli_p_hours(one / 2000), 1);
        assert_eq!(milli_p_hours(one / 2000 - 1), 0);
        let line = UsageLine {
            model: "h20".into(),
            pool_kind: PoolKind::External,
            lease_parts: 1,
            tflops_ms: one * 12 + one / 1000 * 345,
            cost: Fen::ZERO,
            subsidy: Fen::ZERO,
            due: Fen::ZERO,
        };
        assert_eq!(line.p_hours(), "12.345");
    }
}
