//! Property tests over random sequences of accounting operations: vouchers issued with random
//! rates, caps, scopes and validity; leases of random lengths, prices, pools and increments
//! settled (some twice); budgets, holds and adjustments in between. After every sequence:
//! - the ledger balances: sum of charges = sum of voucher debits + sum of tenant dues;
//! - no voucher pays beyond its balance, its cap per lease, its validity, its scope or its rate,
//!   nor for another tenant, and no part is covered beyond its charge;
//! - every charge equals an independent computation from the usage;
//! - a quote made just before a settlement is exactly the settlement;
//! - settling again returns the same settlement and appends nothing;
//! - replaying the entries (directly and through serde) gives the same ledger;
//! - statements and the subsidy report add up to the ledger's totals;
//! - compacting at any month changes no answer (statements, subsidy report, voucher balances,
//!   totals, budgets, accounts), nor do the same operations applied after it; compacting again
//!   or earlier changes nothing; a compacted ledger replays and round-trips through serde;
//! - extreme or invalid input is refused or handled, never a panic, and leaves a consistent
//!   ledger.

use std::collections::BTreeMap;

use proptest::prelude::*;
use suanli_core::{Millis, PoolKind};

use crate::budget::Budget;
use crate::charge::{LeaseId, LeasePart, LeaseUsage, MS_PER_HOUR};
use crate::error::BillingError;
use crate::ledger::{EntryKind, Hold, Ledger, LedgerTotals, SettleOutcome, TenantAccount};
use crate::money::Fen;
use crate::month::Month;
use crate::statement::{SubsidyReport, TenantStatement, VoucherBalance};
use crate::voucher::{FULL_RATE_BP, VoucherId, VoucherScope, VoucherSpec};

const TENANTS: [&str; 3] = ["acme", "globex", "initech"];
const POOLS: [(&str, PoolKind); 4] = [
    ("futian-aicc", PoolKind::LocalCentre),
    ("futian-cloud-a", PoolKind::LocalCloud),
    ("guiyang-1", PoolKind::External),
    ("qingyang-2", PoolKind::External),
];
const MODELS: [(&str, u64); 2] = [("ascend-910b", 376), ("h20", 148)];
/// 2025-01-20 00:00 CST: sequences cross month boundaries.
const T0: Millis = 1_737_302_400_000;
const DAY: Millis = 24 * MS_PER_HOUR;

#[derive(Clone, Debug)]
enum Op {
    Issue {
        tenant: usize,
        face: i64,
        rate_bp: u32,
        cap: Option<i64>,
        scope: u8,
        from: Millis,
        length: Millis,
    },
    Settle {
        tenant: usize,
        start: Millis,
        running: Millis,
        parts: Vec<(usize, usize, u64, i64, u8)>,
    },
    Resettle(usize),
    Budget {
        tenant: usize,
        limit: i64,
        monthly: bool,
    },
    Hold {
        tenant: usize,
        amount: i64,
    },
    Adjust {
        tenant: usize,
        amount: i64,
    },
}

impl Op {
    /// The voucher an `Issue` at index `i` issues.
    fn voucher(&self, i: usize) -> Option<VoucherSpec> {
        let Op::Issue {
            tenant,
            face,
            rate_bp,
            cap,
            scope: code,
            from,
            length,
        } = *self
        else {
            return None;
        };
        Some(VoucherSpec {
            id: VoucherId::new(format!("v{i}")),
            tenant: TENANTS[tenant].into(),
            face_value: Fen(face),
            rate_bp,
            per_lease_cap: cap.map(Fen),
            scope: scope(code),
            valid_from: T0 + from,
            valid_until: T0 + from + length,
        })
    }

    /// The tenant and budget a `Budget` sets.
    fn budget(&self) -> Option<(&'static str, Budget)> {
        let Op::Budget {
            tenant,
            limit,
            monthly,
        } = *self
        else {
            return None;
        };
        let budget = if monthly {
            Budget::monthly(Fen(limit))
        } else {
            Budget::total(Fen(limit))
        };
        Some((TENANTS[tenant], budget))
    }
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (
            0..TENANTS.len(),
            1i64..2_000_000,
            prop_oneof![Just(FULL_RATE_BP), 1u32..=FULL_RATE_BP],
            proptest::option::of(1i64..300_000),
            0u8..4,
            0..40 * DAY,
            1..40 * DAY,
        )
            .prop_map(|(tenant, face, rate_bp, cap, scope, from, length)| Op::Issue {
                tenant,
                face,
                rate_bp,
                cap,
                scope,
                from,
                length,
            }),
        6 => (
            0..TENANTS.len(),
            0..60 * DAY,
            prop_oneof![Just(0), 1..MS_PER_HOUR, 0..5 * DAY],
            proptest::collection::vec(
                (0..POOLS.len(), 0..MODELS.len(), 1u64..=16, 0i64..50_000, 0u8..3),
                1..4,
            ),
        )
            .prop_map(|(tenant, start, running, parts)| Op::Settle {
                tenant,
                start,
                running,
                parts,
            }),
        2 => any::<usize>().prop_map(Op::Resettle),
        1 => (0..TENANTS.len(), 0i64..5_000_000, any::<bool>())
            .prop_map(|(tenant, limit, monthly)| Op::Budget { tenant, limit, monthly }),
        1 => (0..TENANTS.len(), 0i64..100_000).prop_map(|(tenant, amount)| Op::Hold { tenant, amount }),
        1 => (0..TENANTS.len(), -50_000i64..50_000)
            .prop_map(|(tenant, amount)| Op::Adjust { tenant, amount }),
    ]
}

fn scope(code: u8) -> VoucherScope {
    match code {
        0 => VoucherScope::AllPools,
        1 => VoucherScope::local_pools(),
        2 => VoucherScope::PoolKinds([PoolKind::External].into()),
        _ => VoucherScope::Pools(["guiyang-1".to_string(), "futian-aicc".to_string()].into()),
    }
}

fn increment(code: u8) -> Option<Millis> {
    match code {
        0 => None,
        1 => Some(60_000),
        _ => Some(MS_PER_HOUR),
    }
}

/// The charge of a part computed a second, independent way: the rounded-up time by
/// subtraction, half-up rounding as `floor((2n + d) / 2d)`.
fn expected_part_charge(part: &LeasePart, running: Millis) -> i64 {
    let billed = match part.billing_increment_ms {
        Some(inc) if !running.is_multiple_of(inc) => running + (inc - running % inc),
        _ => running,
    } as u128;
    let n = part.devices as u128 * part.price_per_device_hour.0 as u128 * billed;
    let d = MS_PER_HOUR as u128;
    ((2 * n + d) / (2 * d)) as i64
}

/// The lease a `Settle` operation at index `i` settles.
fn lease_usage(
    tenant: usize,
    start: Millis,
    running: Millis,
    parts: &[(usize, usize, u64, i64, u8)],
    i: usize,
) -> LeaseUsage {
    LeaseUsage {
        lease: LeaseId::new(format!("r{i}")),
        tenant: TENANTS[tenant].into(),
        started_at: T0 + start,
        ended_at: T0 + start + running,
        parts: parts
            .iter()
            .map(|&(pool, model, devices, price, inc)| LeasePart {
                pool: POOLS[pool].0.into(),
                pool_kind: POOLS[pool].1,
                model: MODELS[model].0.into(),
                devices,
                tflops: devices * MODELS[model].1,
                price_per_device_hour: Fen(price),
                billing_increment_ms: increment(inc),
            })
            .collect(),
    }
}

/// Runs the operations, checking what holds after each step; returns the ledger.
fn run(ops: &[Op]) -> Result<Ledger, TestCaseError> {
    Ok(run_settling(ops)?.0)
}

/// [`run`], also returning the usage of every lease settled, in order.
fn run_settling(ops: &[Op]) -> Result<(Ledger, Vec<LeaseUsage>), TestCaseError> {
    let mut ledger = Ledger::new();
    let mut settled: Vec<LeaseUsage> = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let now = T0 + i as Millis + 1;
        match op.clone() {
            Op::Issue { .. } => {
                let spec = op.voucher(i).expect("an Issue issues a voucher");
                ledger.issue_voucher(spec, now).unwrap();
            }
            Op::Settle {
                tenant,
                start,
                running,
                parts,
            } => {
                let usage = lease_usage(tenant, start, running, &parts, i);
                let quote = ledger.quote(&usage).unwrap();
                let before = ledger.next_seq();
                let outcome = ledger.settle(usage.clone(), now).unwrap();
                prop_assert!(outcome.newly_settled);
                prop_assert_eq!(&outcome.settlement.bill, &quote);
                prop_assert_eq!(outcome.settlement.seq, before);
                let debits = quote.vouchers.len() as u64;
                prop_assert_eq!(ledger.next_seq(), before + 2 + debits);
                settled.push(usage);
            }
            Op::Resettle(pick) => {
                if settled.is_empty() {
                    continue;
                }
                let usage = settled[pick % settled.len()].clone();
                let existing = ledger.settlement(&usage.lease).unwrap().clone();
                let entries = ledger.next_seq();
                let again = ledger.settle(usage, now).unwrap();
                prop_assert!(!again.newly_settled);
                prop_assert_eq!(again.settlement, existing);
                prop_assert_eq!(ledger.next_seq(), entries);
            }
            Op::Budget { .. } => {
                let (tenant, budget) = op.budget().expect("a Budget sets a budget");
                ledger.set_budget(tenant, Some(budget), now).unwrap();
            }
            Op::Hold { tenant, amount } => {
                // A hold for a lease that a later Settle of the same index would settle.
                let fits = ledger
                    .would_exceed(TENANTS[tenant], Fen(amount), now)
                    .is_ok();
                let account = ledger.tenant(TENANTS[tenant]).cloned().unwrap_or_default();
                if let Some(budget) = account.budget {
                    let spent = match budget.period {
                        crate::BudgetPeriod::Total => account.spent_total,
                        crate::BudgetPeriod::Monthly => account
                            .spent_by_month
                            .get(&Month::containing(now))
                            .copied()
                            .unwrap_or_default(),
                    };
                    prop_assert_eq!(fits, spent.0 + account.held.0 + amount <= budget.limit.0);
                } else {
                    prop_assert!(fits);
                }
                if fits {
                    ledger
                        .place_hold(
                            LeaseId::new(format!("h{i}")),
                            TENANTS[tenant],
                            Fen(amount),
                            now,
                        )
                        .unwrap();
                }
            }
            Op::Adjust { tenant, amount } => {
                let result = ledger.adjust(TENANTS[tenant], Fen(amount), "correction", now);
                prop_assert_eq!(result.is_ok(), amount != 0);
            }
        }
        check_invariants(&ledger)?;
    }
    Ok((ledger, settled))
}

fn check_invariants(ledger: &Ledger) -> Result<(), TestCaseError> {
    // The ledger balances, in its running totals and in its entries.
    let totals = ledger.totals();
    prop_assert_eq!(
        totals.charges.0,
        totals.voucher_debits.0 + totals.tenant_dues.0
    );
    let (mut charges, mut debits, mut dues) = (0i64, 0i64, 0i64);
    let mut debited: BTreeMap<VoucherId, i64> = BTreeMap::new();
    for entry in ledger.entries() {
        match &entry.kind {
            EntryKind::LeaseCharged { total, .. } => charges += total.0,
            EntryKind::VoucherDebited {
                voucher, amount, ..
            } => {
                debits += amount.0;
                *debited.entry(voucher.clone()).or_default() += amount.0;
            }
            EntryKind::TenantDue { amount, .. } => dues += amount.0,
            _ => {}
        }
    }
    prop_assert_eq!(charges, debits + dues);
    prop_assert_eq!(charges, totals.charges.0);

    // No voucher pays beyond its balance.
    for v in ledger.vouchers() {
        let paid = debited.get(&v.spec.id).copied().unwrap_or(0);
        prop_assert_eq!(v.used.0, paid);
        prop_assert!(
            paid <= v.spec.face_value.0,
            "voucher {} overdrawn",
            v.spec.id
        );
    }

    for s in ledger.settlements() {
        let bill = &s.bill;
        let running = bill.usage.running_ms();
        // Charges match an independent computation.
        let mut total = 0;
        for (part, charge) in bill.usage.parts.iter().zip(&bill.parts) {
            prop_assert_eq!(charge.amount.0, expected_part_charge(part, running));
            total += charge.amount.0;
        }
        prop_assert_eq!(bill.charge.0, total);
        prop_assert_eq!(bill.tenant_due.0, bill.charge.0 - bill.subsidy.0);
        prop_assert!(!bill.tenant_due.is_negative());

        let mut per_voucher: BTreeMap<&VoucherId, i64> = BTreeMap::new();
        let mut per_part = vec![0i64; bill.parts.len()];
        for share in &bill.vouchers {
            let v = ledger.voucher(&share.voucher).unwrap();
            let part = &bill.usage.parts[share.part as usize];
            let charge = bill.parts[share.part as usize].amount.0;
            prop_assert!(share.amount.is_positive());
            prop_assert_eq!(
                &v.spec.tenant,
                &bill.usage.tenant,
                "another tenant's voucher"
            );
            prop_assert!(v.spec.scope.covers(part), "voucher out of scope");
            let inside = v
                .spec
                .overlap_ms(bill.usage.started_at, bill.usage.ended_at);
            prop_assert!(inside > 0, "voucher outside its validity");
            // Rate and validity: share <= charge x rate x inside / running.
            prop_assert!(
                share.amount.0 as u128 * FULL_RATE_BP as u128 * running as u128
                    <= charge as u128 * v.spec.rate_bp as u128 * inside as u128,
                "voucher {} pays beyond its rate or validity",
                v.spec.id
            );
            *per_voucher.entry(&share.voucher).or_default() += share.amount.0;
            per_part[share.part as usize] += share.amount.0;
        }
        for (id, paid) in per_voucher {
            if let Some(cap) = ledger.voucher(id).unwrap().spec.per_lease_cap {
                prop_assert!(paid <= cap.0, "voucher {} beyond its cap", id);
            }
        }
        for (paid, charge) in per_part.iter().zip(&bill.parts) {
            prop_assert!(*paid <= charge.amount.0);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn ledger_keeps_its_invariants(ops in proptest::collection::vec(op(), 1..60)) {
        let ledger = run(&ops)?;

        // Replay gives the same ledger, directly and through serde.
        let replayed = Ledger::from_entries(ledger.entries().to_vec()).unwrap();
        prop_assert_eq!(&replayed, &ledger);
        let json = serde_json::to_string(&ledger).unwrap();
        let back: Ledger = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(&back, &ledger);

        // Statements and the subsidy report add up to the ledger.
        let first = Month::containing(T0);
        let last = Month::containing(T0 + 200 * DAY);
        let report = ledger.subsidy_report(first, last).unwrap();
        let spent: i64 = report.months.iter().map(|m| m.spent.0).sum();
        prop_assert_eq!(spent, ledger.totals().voucher_debits.0);
        let (mut cost, mut subsidy, mut payable) = (0i64, 0i64, 0i64);
        for tenant in TENANTS {
            let mut month = first;
            while month <= last {
                let s = ledger.tenant_statement(tenant, month).unwrap();
                prop_assert_eq!(s.cost.0, s.lines.iter().map(|l| l.cost.0).sum::<i64>());
                prop_assert_eq!(s.due.0, s.lines.iter().map(|l| l.due.0).sum::<i64>());
                cost += s.cost.0;
                subsidy += s.subsidy.0;
                payable += s.payable.0;
                month = month.next();
            }
        }
        let totals = ledger.totals();
        prop_assert_eq!(cost, totals.charges.0);
        prop_assert_eq!(subsidy, totals.voucher_debits.0);
        prop_assert_eq!(payable, totals.tenant_dues.0 + totals.adjustments.0);
    }

    /// Without caps and with balances too large to run out, the total subsidy of a lease does
    /// not depend on the order vouchers pay in (only who pays does), up to the rounding of
    /// each share to the fen.
    #[test]
    fn uncapped_subsidy_does_not_depend_on_order(
        rates in proptest::collection::vec(1u32..=FULL_RATE_BP, 1..5),
        price in 1i64..100_000,
        running in 1..10 * MS_PER_HOUR,
    ) {
        let subsidy_with = |order: &[u32]| {
            let mut ledger = Ledger::new();
            for (i, &rate_bp) in order.iter().enumerate() {
                ledger.issue_voucher(VoucherSpec {
                    id: VoucherId::new(format!("v{i}")),
                    tenant: "acme".into(),
                    face_value: Fen(i64::MAX / 8),
                    rate_bp,
                    per_lease_cap: None,
                    scope: VoucherScope::AllPools,
                    valid_from: 0,
                    valid_until: T0 + 100 * DAY,
                }, 0).unwrap();
            }
            let usage = LeaseUsage {
                lease: LeaseId::new("r"),
                tenant: "acme".into(),
                started_at: T0,
                ended_at: T0 + running,
                parts: vec![LeasePart {
                    pool: "futian-aicc".into(),
                    pool_kind: PoolKind::LocalCentre,
                    model: "h20".into(),
                    devices: 8,
                    tflops: 8 * 148,
                    price_per_device_hour: Fen(price),
                    billing_increment_ms: None,
                }],
            };
            ledger.quote(&usage).unwrap()
        };
        let forward = subsidy_with(&rates);
        let reversed: Vec<u32> = rates.iter().rev().copied().collect();
        let backward = subsidy_with(&reversed);
        prop_assert_eq!(forward.charge, backward.charge);
        let difference = (forward.subsidy.0 - backward.subsidy.0).abs();
        prop_assert!(difference <= rates.len() as i64, "{forward:?} vs {backward:?}");
        // Shares round down, so the tenant pays at least charge x product of (1 - rate):
        // due x 10000^k >= charge x product of (10000 - rate_bp), in exact integers.
        let mut scale = 1u128;
        let mut uncovered = forward.charge.0 as u128;
        for &r in &rates {
            scale *= u128::from(FULL_RATE_BP);
            uncovered *= u128::from(FULL_RATE_BP - r);
        }
        prop_assert!(forward.tenant_due.0 as u128 * scale >= uncovered);
    }
}

fn any_usage() -> impl Strategy<Value = LeaseUsage> {
    (
        0..4usize,
        0..TENANTS.len(),
        prop_oneof![any::<u64>(), T0..T0 + 10 * DAY],
        prop_oneof![any::<u64>(), 0..10 * DAY],
        proptest::collection::vec(
            (
                0..POOLS.len(),
                prop_oneof![any::<u64>(), 0..20u64],
                any::<u64>(),
                prop_oneof![any::<i64>(), -10..100_000i64],
                proptest::option::of(prop_oneof![any::<u64>(), 0..2 * MS_PER_HOUR]),
            ),
            0..3,
        ),
    )
        .prop_map(|(lease, tenant, start, running, parts)| LeaseUsage {
            lease: LeaseId::new(format!("r{lease}")),
            tenant: TENANTS[tenant].into(),
            started_at: start,
            ended_at: start.wrapping_add(running),
            parts: parts
                .into_iter()
                .map(|(pool, devices, tflops, price, increment)| LeasePart {
                    pool: POOLS[pool].0.into(),
                    pool_kind: POOLS[pool].1,
                    model: "h20".into(),
                    devices,
                    tflops,
                    price_per_device_hour: Fen(price),
                    billing_increment_ms: increment,
                })
                .collect(),
        })
}

fn any_voucher() -> impl Strategy<Value = VoucherSpec> {
    (
        0..4usize,
        0..TENANTS.len(),
        prop_oneof![any::<i64>(), -10..1_000_000i64],
        prop_oneof![any::<u32>(), 0..=FULL_RATE_BP + 1],
        proptest::option::of(prop_oneof![any::<i64>(), -10..100_000i64]),
        0u8..4,
        prop_oneof![any::<u64>(), T0..T0 + 10 * DAY],
        prop_oneof![any::<u64>(), T0..T0 + 20 * DAY],
    )
        .prop_map(
            |(id, tenant, face, rate_bp, cap, code, from, until)| VoucherSpec {
                id: VoucherId::new(format!("v{id}")),
                tenant: TENANTS[tenant].into(),
                face_value: Fen(face),
                rate_bp,
                per_lease_cap: cap.map(Fen),
                scope: scope(code),
                valid_from: from,
                valid_until: until,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Extreme and invalid input (any u64 time, any i64 amount, zero devices, zero increments,
    /// rates over 100%, validity backwards, empty leases, reused ids) is refused with an error
    /// or handled, never a panic, and the ledger stays consistent.
    #[test]
    fn bad_input_never_panics(
        vouchers in proptest::collection::vec(any_voucher(), 0..6),
        usages in proptest::collection::vec(any_usage(), 0..8),
        amounts in proptest::collection::vec(any::<i64>(), 4),
        times in proptest::collection::vec(any::<u64>(), 3),
    ) {
        let mut ledger = Ledger::new();
        for v in vouchers {
            let _ = ledger.issue_voucher(v, times[0]);
        }
        let _ = ledger.set_budget("acme", Some(Budget::monthly(Fen(amounts[0]))), times[1]);
        let _ = ledger.place_hold(LeaseId::new("r0"), "acme", Fen(amounts[1]), times[1]);
        let _ = ledger.adjust("acme", Fen(amounts[2]), "x", times[2]);
        for usage in usages {
            let _ = ledger.quote(&usage);
            let _ = ledger.settle(usage.clone(), times[2]);
            let _ = ledger.settle(usage, times[2]);
            let _ = ledger.would_exceed("acme", Fen(amounts[3]), times[0]);
        }
        check_invariants_without_recomputing(&ledger)?;
        let replayed = Ledger::from_entries(ledger.entries().to_vec()).unwrap();
        prop_assert_eq!(&replayed, &ledger);
        for &t in &times {
            let month = Month::containing(t);
            let _ = ledger.tenant_statement("acme", month).map(|s| s.usage_csv());
            let _ = ledger.subsidy_report(month, month.next()).map(|r| r.to_csv());
        }
    }
}

/// The balance and voucher checks of `check_invariants`, without the independent charge
/// computation (which is not written for overflowing inputs).
fn check_invariants_without_recomputing(ledger: &Ledger) -> Result<(), TestCaseError> {
    let totals = ledger.totals();
    prop_assert_eq!(
        totals.charges.0 as i128,
        totals.voucher_debits.0 as i128 + totals.tenant_dues.0 as i128
    );
    for v in ledger.vouchers() {
        prop_assert!(v.used <= v.spec.face_value);
    }
    for s in ledger.settlements() {
        prop_assert!(!s.bill.tenant_due.is_negative());
        for share in &s.bill.vouchers {
            let v = ledger.voucher(&share.voucher).unwrap();
            prop_assert_eq!(&v.spec.tenant, &s.bill.usage.tenant);
            prop_assert!(
                v.spec
                    .scope
                    .covers(&s.bill.usage.parts[share.part as usize])
            );
            prop_assert!(
                v.spec
                    .overlap_ms(s.bill.usage.started_at, s.bill.usage.ended_at)
                    > 0
            );
        }
    }
    Ok(())
}

/// Everything a caller can ask a ledger, over the months the operations reach, for comparing a
/// compacted ledger with the same ledger uncompacted.
#[derive(Debug, PartialEq)]
struct Answers {
    statements: Vec<Result<TenantStatement, BillingError>>,
    csv: Vec<String>,
    report: Result<SubsidyReport, BillingError>,
    balances: Vec<VoucherBalance>,
    totals: LedgerTotals,
    accounts: Vec<Option<TenantAccount>>,
    probes: Vec<Result<(), BillingError>>,
    subsidy_budget: Option<Fen>,
    holds: Vec<Option<Hold>>,
}

/// The first and last month the operations reach (leases end up to about 65 days after T0).
fn reach() -> (Month, Month) {
    (Month::containing(T0), Month::containing(T0 + 120 * DAY))
}

fn answers(ledger: &Ledger) -> Answers {
    let (first, last) = reach();
    let mut statements = Vec::new();
    let mut csv = Vec::new();
    for tenant in TENANTS {
        let mut month = first;
        while month <= last {
            let s = ledger.tenant_statement(tenant, month);
            if let Ok(s) = &s {
                csv.push(s.summary_csv());
                csv.push(s.vouchers_csv());
            }
            statements.push(s);
            month = month.next();
        }
    }
    let report = ledger.subsidy_report(first, last);
    if let Ok(r) = &report {
        csv.push(r.to_csv());
    }
    let mut probes = Vec::new();
    for tenant in TENANTS {
        for at in [T0, T0 + 15 * DAY, T0 + 45 * DAY, T0 + 75 * DAY] {
            for amount in [0, 50_000, 2_000_000] {
                probes.push(ledger.would_exceed(tenant, Fen(amount), at));
            }
        }
    }
    Answers {
        statements,
        csv,
        report,
        balances: ledger.voucher_balances(None),
        totals: ledger.totals(),
        accounts: TENANTS.iter().map(|t| ledger.tenant(t).cloned()).collect(),
        probes,
        subsidy_budget: ledger.subsidy_budget_monthly(),
        // Hold ids are `h{i}` for operation indices below 90.
        holds: (0..90)
            .map(|i| ledger.hold(&LeaseId::new(format!("h{i}"))).cloned())
            .collect(),
    }
}

/// What an operation answered, for comparing two ledgers given the same operation.
#[derive(Debug, PartialEq)]
enum Answer {
    Done(Result<(), BillingError>),
    Settled(Result<SettleOutcome, BillingError>),
    Held(Result<(), BillingError>, Option<Result<(), BillingError>>),
}

/// The lease a `Settle` or `Resettle` at index `i` names, if any.
fn named_lease(op: &Op, i: usize, settled: &[LeaseUsage]) -> Option<LeaseUsage> {
    match op {
        Op::Settle {
            tenant,
            start,
            running,
            parts,
        } => Some(lease_usage(*tenant, *start, *running, parts, i)),
        Op::Resettle(pick) if !settled.is_empty() => Some(settled[pick % settled.len()].clone()),
        _ => None,
    }
}

/// Performs one operation at index `i` and time `now`, whatever it answers.
fn perform(
    ledger: &mut Ledger,
    op: &Op,
    i: usize,
    now: Millis,
    lease: Option<LeaseUsage>,
) -> Answer {
    match op.clone() {
        Op::Issue { .. } => Answer::Done(
            ledger.issue_voucher(op.voucher(i).expect("an Issue issues a voucher"), now),
        ),
        Op::Settle { .. } | Op::Resettle(_) => match lease {
            Some(usage) => Answer::Settled(ledger.settle(usage, now)),
            None => Answer::Done(Ok(())),
        },
        Op::Budget { .. } => {
            let (tenant, budget) = op.budget().expect("a Budget sets a budget");
            Answer::Done(ledger.set_budget(tenant, Some(budget), now))
        }
        Op::Hold { tenant, amount } => {
            let fits = ledger.would_exceed(TENANTS[tenant], Fen(amount), now);
            let placed = fits.is_ok().then(|| {
                ledger.place_hold(
                    LeaseId::new(format!("h{i}")),
                    TENANTS[tenant],
                    Fen(amount),
                    now,
                )
            });
            Answer::Held(fits, placed)
        }
        Op::Adjust { tenant, amount } => {
            Answer::Done(ledger.adjust(TENANTS[tenant], Fen(amount), "correction", now))
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Compaction changes no answer, now or after further operations, and is stable.
    #[test]
    fn compaction_changes_no_answer(
        ops in proptest::collection::vec(op(), 1..60),
        cut in 0u8..5,
        more in proptest::collection::vec(op(), 0..30),
    ) {
        let (mut full, mut settled) = run_settling(&ops)?;
        let mut cut_month = Month::containing(T0);
        for _ in 0..cut {
            cut_month = cut_month.next();
        }
        let mut compacted = full.clone();
        let outcome = compacted.compact(cut_month, T0 + 200 * DAY).unwrap();
        // A ledger without entries has nothing to fold and closes nothing.
        let closed = compacted.closed_before();
        prop_assert_eq!(outcome.compacted, !full.entries().is_empty());
        prop_assert_eq!(closed, outcome.compacted.then_some(cut_month));
        prop_assert_eq!(compacted.next_seq(), full.next_seq());
        prop_assert_eq!(compacted.entries().len(), full.entries().len().min(1));
        prop_assert!(compacted.settlements().all(|s| !Month::containing(s.bill.usage.ended_at).lt(&cut_month)));
        prop_assert_eq!(answers(&compacted), answers(&full));

        // Again, or earlier: nothing changes.
        let once = compacted.clone();
        for month in [cut_month, Month::containing(T0), Month::containing(0)] {
            prop_assert!(!compacted.compact(month, T0 + 201 * DAY).unwrap().compacted);
            prop_assert_eq!(&compacted, &once);
        }
        // It replays alone, after the entries it replaced, and through serde.
        prop_assert_eq!(&Ledger::from_entries(compacted.entries().to_vec()).unwrap(), &compacted);
        let mut log = full.entries().to_vec();
        log.extend(compacted.entries().iter().cloned());
        prop_assert_eq!(&Ledger::from_entries(log).unwrap(), &compacted);
        let json = serde_json::to_string(&compacted).unwrap();
        let back: Ledger = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(&back, &compacted);
        prop_assert_eq!(answers(&back), answers(&compacted));

        // The same operations on both answer the same, except that the compacted ledger
        // refuses leases of closed months (and the uncompacted one is then left alone).
        for (k, op) in more.iter().enumerate() {
            let i = ops.len() + k;
            let now = T0 + (k as Millis % 3) * 30 * DAY + i as Millis;
            let lease = named_lease(op, i, &settled);
            if let Some(usage) = &lease {
                let month = Month::containing(usage.ended_at);
                if let Some(closed_before) = closed
                    && month < closed_before
                {
                    let refused = compacted.settle(usage.clone(), now);
                    let expected = Err(BillingError::LeaseInClosedMonth {
                        lease: usage.lease.clone(),
                        month,
                        closed_before,
                    });
                    prop_assert_eq!(refused, expected);
                    continue;
                }
            }
            let a = perform(&mut full, op, i, now, lease.clone());
            let b = perform(&mut compacted, op, i, now, lease.clone());
            if let (Answer::Settled(Ok(outcome)), Some(usage)) = (&a, lease)
                && outcome.newly_settled
            {
                settled.push(usage);
            }
            prop_assert_eq!(a, b);
            prop_assert_eq!(full.next_seq(), compacted.next_seq());
            prop_assert_eq!(answers(&compacted), answers(&full));
        }
        prop_assert_eq!(&Ledger::from_entries(compacted.entries().to_vec()).unwrap(), &compacted);

        // Compacting a month further: a second checkpoint on one, the first on the other.
        let later = cut_month.next();
        compacted.compact(later, T0 + 202 * DAY).unwrap();
        full.compact(later, T0 + 202 * DAY).unwrap();
        prop_assert_eq!(answers(&compacted), answers(&full));
        let json = serde_json::to_string(&compacted).unwrap();
        let back: Ledger = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(&back, &compacted);
    }
}
