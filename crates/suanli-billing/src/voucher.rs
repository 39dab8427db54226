//! Compute vouchers (算力券) and how they share a lease's charge.
//!
//! A voucher pays `rate` of the bills of one tenant, within a scope of pools and a validity
//! period, until its face value is spent. How one lease's charge is shared
//! ([`allocate`]):
//! - **Which vouchers**: the tenant's own, with a balance left, whose validity `[from, until)`
//!   overlaps the lease's running time; each only on the parts of the lease in its scope.
//! - **Order**: earliest `valid_until` first (oldest expiring first), then the order of issue,
//!   so a voucher about to lapse is used before one that will keep.
//! - **Combination**: each voucher pays its rate of what the vouchers before it left uncovered
//!   (two 50% vouchers cover 75%, not 100%): the tenant always pays a share unless a voucher
//!   is at 100%, and without caps or exhausted balances the total subsidy does not depend on the
//!   order, only who pays it does.
//! - **Expiry in the middle of a lease**: a voucher covers the share of the charge for the
//!   running time inside its validity, pro rata: it pays
//!   `uncovered x rate x (running ms inside validity) / (running ms)`. A voucher that starts
//!   in the middle of a lease is treated the same way.
//! - **Limits**: never more than the voucher's remaining balance, never more than its cap per
//!   lease over all parts of the lease together.
//! - **Rounding**: each voucher's share is rounded **down** to the fen, so a voucher never pays
//!   a fraction of a fen it does not owe; the tenant pays the rest, to the fen.
//!
//! Vouchers pay at settlement, with their balances at that moment: a voucher issued after a
//! lease was settled does not reach back to it, even if its validity covers the lease.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};
use suanli_core::{Millis, PoolKind, Subsidy, SubsidyPools};

use crate::charge::{LeasePart, LeaseUsage, PartCharge};
use crate::error::BillingError;
use crate::money::{Fen, fen_from_u128};

/// Basis points in 100%.
pub const FULL_RATE_BP: u32 = 10_000;

/// An operator's identifier of a voucher, e.g. `FT-2025-0001`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct VoucherId(pub String);

impl VoucherId {
    /// A voucher id from anything string-like.
    pub fn new(id: impl Into<String>) -> VoucherId {
        VoucherId(id.into())
    }
}

impl fmt::Display for VoucherId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a voucher may pay.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VoucherScope {
    /// Every pool.
    AllPools,
    /// Only these pools (by id).
    Pools(BTreeSet<String>),
    /// Only pools of these kinds, e.g. the local centre and clouds (the municipal pools).
    PoolKinds(BTreeSet<PoolKind>),
}

impl VoucherScope {
    /// Only the district's own pools: the local centre and the local clouds.
    pub fn local_pools() -> VoucherScope {
        VoucherScope::PoolKinds([PoolKind::LocalCentre, PoolKind::LocalCloud].into())
    }

    /// Whether the voucher may pay for this part of a lease.
    pub fn covers(&self, part: &LeasePart) -> bool {
        match self {
            VoucherScope::AllPools => true,
            VoucherScope::Pools(pools) => pools.contains(&part.pool),
            VoucherScope::PoolKinds(kinds) => kinds.contains(&part.pool_kind),
        }
    }

    /// A short text for reports: `all`, `pools:a;b`, `kinds:local_centre;local_cloud`.
    pub fn label(&self) -> String {
        match self {
            VoucherScope::AllPools => "all".into(),
            VoucherScope::Pools(pools) => {
                format!(
                    "pools:{}",
                    pools.iter().cloned().collect::<Vec<_>>().join(";")
                )
            }
            VoucherScope::PoolKinds(kinds) => format!(
                "kinds:{}",
                kinds
                    .iter()
                    .map(|k| k.as_str())
                    .collect::<Vec<_>>()
                    .join(";")
            ),
        }
    }
}

/// A voucher as an operator issues it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VoucherSpec {
    /// Unique id.
    pub id: VoucherId,
    /// The tenant it is issued to; no other tenant can use it.
    pub tenant: String,
    /// What it can pay in all, above zero.
    pub face_value: Fen,
    /// Share of each bill it pays, in basis points: 5000 = 50%; 1..=10000.
    pub rate_bp: u32,
    /// Most it pays towards any one lease; `None` = no cap.
    pub per_lease_cap: Option<Fen>,
    /// Pools it pays for.
    pub scope: VoucherScope,
    /// Start of validity, unix ms, inclusive.
    pub valid_from: Millis,
    /// End of validity, unix ms, exclusive.
    pub valid_until: Millis,
}

impl VoucherSpec {
    /// Checks the voucher's fields; see [`BillingError`] for what is refused.
    pub fn validate(&self) -> Result<(), BillingError> {
        if self.id.0.is_empty() {
            return Err(BillingError::EmptyField { field: "voucher" });
        }
        if self.tenant.is_empty() {
            return Err(BillingError::EmptyField { field: "tenant" });
        }
        if !self.face_value.is_positive() {
            return Err(BillingError::NotPositive {
                field: "face_value",
                value: self.face_value,
            });
        }
        if self.rate_bp == 0 || self.rate_bp > FULL_RATE_BP {
            return Err(BillingError::RateOutOfRange {
                voucher: self.id.clone(),
                rate_bp: self.rate_bp,
            });
        }
        if let Some(cap) = self.per_lease_cap
            && !cap.is_positive()
        {
            return Err(BillingError::NotPositive {
                field: "per_lease_cap",
                value: cap,
            });
        }
        if self.valid_until <= self.valid_from {
            return Err(BillingError::ValidityEndsBeforeStart {
                voucher: self.id.clone(),
                from: self.valid_from,
                until: self.valid_until,
            });
        }
        let empty = match &self.scope {
            VoucherScope::AllPools => false,
            VoucherScope::Pools(pools) => pools.is_empty() || pools.iter().any(|p| p.is_empty()),
            VoucherScope::PoolKinds(kinds) => kinds.is_empty(),
        };
        if empty {
            return Err(BillingError::EmptyScope {
                voucher: self.id.clone(),
            });
        }
        Ok(())
    }

    /// Milliseconds of `[start, end)` inside the validity period.
    pub fn overlap_ms(&self, start: Millis, end: Millis) -> Millis {
        let from = start.max(self.valid_from);
        let until = end.min(self.valid_until);
        until.saturating_sub(from)
    }
}

/// An issued voucher and what it has paid.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Voucher {
    /// As issued.
    pub spec: VoucherSpec,
    /// When it was issued, unix ms.
    pub issued_at: Millis,
    /// Sequence number of its issue entry: the tie-break after `valid_until`.
    pub issue_seq: u64,
    /// What it has paid so far.
    pub used: Fen,
}

impl Voucher {
    /// What it can still pay.
    pub fn remaining(&self) -> Fen {
        // `used <= face_value` is kept by every debit of the ledger; saturating keeps a voucher
        // built by hand from overflowing.
        Fen(self.spec.face_value.0.saturating_sub(self.used.0))
    }

    /// The order in which vouchers pay: oldest expiring first, then order of issue.
    pub fn payment_order(&self) -> (Millis, u64) {
        (self.spec.valid_until, self.issue_seq)
    }

    /// Whether it can pay a bill settled at `at`: valid then and not used up.
    pub fn can_pay_at(&self, at: Millis) -> bool {
        self.spec.valid_from <= at && at < self.spec.valid_until && self.remaining().is_positive()
    }

    /// The voucher as placement sees it (for the policy "cheapest after subsidy"): its rate
    /// and scope, not its balance or cap.
    pub fn as_subsidy(&self) -> Subsidy {
        Subsidy {
            rate_bp: self.spec.rate_bp,
            pools: match &self.spec.scope {
                VoucherScope::AllPools => SubsidyPools::All,
                VoucherScope::Pools(p) => SubsidyPools::Pools(p.clone()),
                VoucherScope::PoolKinds(k) => SubsidyPools::Kinds(k.clone()),
            },
        }
    }
}

/// What one voucher pays towards one part of a lease.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VoucherShare {
    /// The voucher.
    pub voucher: VoucherId,
    /// Index of the lease part.
    pub part: u32,
    /// The amount, above zero.
    pub amount: Fen,
}

/// Shares a charged lease among the vouchers given (in any order; they are sorted here), by the
/// rules of the module documentation. Vouchers of other tenants are skipped. `charges` are the
/// lease's part charges ([`crate::charge_lease`]), one per part.
pub fn allocate<'a>(
    usage: &LeaseUsage,
    charges: &[PartCharge],
    vouchers: impl IntoIterator<Item = &'a Voucher>,
) -> Result<Vec<VoucherShare>, BillingError> {
    if charges.len() != usage.parts.len() {
        return Err(BillingError::InvalidLeasePart {
            lease: usage.lease.clone(),
            part: charges.len().min(usage.parts.len()),
            reason: format!("{} charges for {} parts", charges.len(), usage.parts.len()),
        });
    }
    let mut candidates: Vec<&Voucher> = vouchers
        .into_iter()
        .filter(|v| v.spec.tenant == usage.tenant && v.remaining().is_positive())
        .collect();
    candidates.sort_by_key(|v| v.payment_order());

    let running = u128::from(usage.running_ms());
    let mut uncovered: Vec<u128> = charges.iter().map(|c| c.amount.0.max(0) as u128).collect();
    let mut shares = Vec::new();
    for voucher in candidates {
        let inside = u128::from(voucher.spec.overlap_ms(usage.started_at, usage.ended_at));
        if inside == 0 || running == 0 {
            continue;
        }
        let mut left = voucher.remaining().0 as u128;
        if let Some(cap) = voucher.spec.per_lease_cap {
            left = left.min(cap.0.max(0) as u128);
        }
        for (i, part) in usage.parts.iter().enumerate() {
            if left == 0 {
                break;
            }
            if !voucher.spec.scope.covers(part) || uncovered[i] == 0 {
                continue;
            }
            let share = pro_rata_share(uncovered[i], voucher.spec.rate_bp, inside, running)?;
            // `share <= uncovered` for a valid voucher; the bound keeps a hand-made one (rate
            // over 100%) from paying more than the part costs.
            let pay = share.min(left).min(uncovered[i]);
            if pay == 0 {
                continue;
            }
            uncovered[i] -= pay;
            left -= pay;
            shares.push(VoucherShare {
                voucher: voucher.spec.id.clone(),
                part: i as u32,
                amount: fen_from_u128(pay, "voucher share")?,
            });
        }
    }
    Ok(shares)
}

/// `floor(uncovered x rate_bp / 10000 x inside / running)` in exact integers.
fn pro_rata_share(
    uncovered: u128,
    rate_bp: u32,
    inside: u128,
    running: u128,
) -> Result<u128, BillingError> {
    let overflow = BillingError::Overflow {
        what: "voucher share",
    };
    let rated = uncovered
        .checked_mul(u128::from(rate_bp))
        .ok_or(overflow.clone())?;
    if inside >= running {
        // Valid for the whole lease: no time factor, and no product that could overflow.
        return Ok(rated / u128::from(FULL_RATE_BP));
    }
    let numerator = rated.checked_mul(inside).ok_or(overflow.clone())?;
    let denominator = u128::from(FULL_RATE_BP)
        .checked_mul(running)
        .ok_or(overflow)?;
    Ok(numerator / denominator)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::charge::{LeaseId, charge_lease};

    const HOUR: Millis = 3_600_000;

    fn spec(id: &str, rate_bp: u32, face: i64, from: Millis, until: Millis) -> VoucherSpec {
        VoucherSpec {
            id: VoucherId::new(id),
            tenant: "acme".into(),
            face_value: Fen(face),
            rate_bp,
            per_lease_cap: None,
            scope: VoucherScope::AllPools,
            valid_from: from,
            valid_until: until,
        }
    }

    fn voucher(spec: VoucherSpec, seq: u64) -> Voucher {
        Voucher {
            spec,
            issued_at: 0,
            issue_seq: seq,
            used: Fen::ZERO,
        }
    }

    fn part(pool: &str, kind: PoolKind, price: i64) -> LeasePart {
        LeasePart {
            pool: pool.into(),
            pool_kind: kind,
            model: "h20".into(),
            devices: 1,
            tflops: 148,
            price_per_device_hour: Fen(price),
            billing_increment_ms: None,
        }
    }

    fn lease(start: Millis, end: Millis, parts: Vec<LeasePart>) -> LeaseUsage {
        LeaseUsage {
            lease: LeaseId::new("r1"),
            tenant: "acme".into(),
            started_at: start,
            ended_at: end,
            parts,
        }
    }

    fn shares(usage: &LeaseUsage, vouchers: &[Voucher]) -> Vec<(String, u32, i64)> {
        let (charges, _) = charge_lease(usage).unwrap();
        allocate(usage, &charges, vouchers)
            .unwrap()
            .into_iter()
            .map(|s| (s.voucher.0, s.part, s.amount.0))
            .collect()
    }

    #[test]
    fn a_voucher_expiring_mid_lease_covers_only_its_time() {
        // Four hours at ¥100/h = ¥400; a 50% voucher valid for the first hour pays 50% of ¥100.
        let usage = lease(0, 4 * HOUR, vec![part("p", PoolKind::LocalCentre, 10_000)]);
        let v = voucher(spec("v", 5_000, 1_000_000, 0, HOUR), 0);
        assert_eq!(shares(&usage, &[v]), vec![("v".into(), 0, 5_000)]);
        // One that starts after the lease's first three hours pays for the last one.
        let late = voucher(spec("late", 5_000, 1_000_000, 3 * HOUR, 10 * HOUR), 0);
        assert_eq!(shares(&usage, &[late]), vec![("late".into(), 0, 5_000)]);
        // One that ended before the lease began pays nothing.
        let gone = voucher(spec("gone", 5_000, 1_000_000, 0, 1), 0);
        let usage = lease(1, HOUR, vec![part("p", PoolKind::LocalCentre, 10_000)]);
        assert!(shares(&usage, &[gone]).is_empty());
    }

    #[test]
    fn pro_rata_share_rounds_down_to_the_fen() {
        // ¥1.00 over 3 ms, voucher at 100% for 1 ms of them: 33.33 fen -> 33.
        let usage = lease(0, 3, vec![part("p", PoolKind::External, 120_000_000)]);
        let (charges, total) = charge_lease(&usage).unwrap();
        assert_eq!(total, Fen(100));
        let v = voucher(spec("v", FULL_RATE_BP, 1_000, 2, 100), 0);
        let s = allocate(&usage, &charges, [&v]).unwrap();
        assert_eq!(s[0].amount, Fen(33));
    }

    #[test]
    fn vouchers_pay_oldest_expiring_first_each_on_what_is_left() {
        let usage = lease(0, HOUR, vec![part("p", PoolKind::LocalCloud, 10_000)]);
        let keeps = voucher(spec("keeps", 5_000, 1_000_000, 0, 100 * HOUR), 0);
        let lapses = voucher(spec("lapses", 5_000, 1_000_000, 0, 2 * HOUR), 1);
        // "lapses" was issued later but expires first: it pays 50% of ¥100, then "keeps" pays
        // 50% of the ¥50 left.
        assert_eq!(
            shares(&usage, &[keeps, lapses]),
            vec![("lapses".into(), 0, 5_000), ("keeps".into(), 0, 2_500)]
        );
    }

    #[test]
    fn same_expiry_pays_in_order_of_issue() {
        let usage = lease(0, HOUR, vec![part("p", PoolKind::LocalCloud, 10_000)]);
        let second = voucher(spec("b", 10_000, 3_000, 0, 2 * HOUR), 7);
        let first = voucher(spec("a", 10_000, 3_000, 0, 2 * HOUR), 3);
        assert_eq!(
            shares(&usage, &[second, first]),
            vec![("a".into(), 0, 3_000), ("b".into(), 0, 3_000)]
        );
    }

    #[test]
    fn balance_and_per_lease_cap_limit_a_voucher() {
        let usage = lease(
            0,
            HOUR,
            vec![
                part("a", PoolKind::LocalCentre, 10_000),
                part("b", PoolKind::LocalCentre, 10_000),
            ],
        );
        let mut capped = spec("capped", 10_000, 1_000_000, 0, 2 * HOUR);
        capped.per_lease_cap = Some(Fen(12_000));
        // The cap is per lease, over both parts together.
        assert_eq!(
            shares(&usage, &[voucher(capped, 0)]),
            vec![("capped".into(), 0, 10_000), ("capped".into(), 1, 2_000)]
        );
        let mut low = voucher(spec("low", 10_000, 5_000, 0, 2 * HOUR), 0);
        low.used = Fen(4_000);
        assert_eq!(shares(&usage, &[low]), vec![("low".into(), 0, 1_000)]);
    }

    #[test]
    fn scope_limits_a_voucher_to_its_pools() {
        let usage = lease(
            0,
            HOUR,
            vec![
                part("futian-aicc", PoolKind::LocalCentre, 10_000),
                part("guiyang-1", PoolKind::External, 10_000),
            ],
        );
        let mut local = spec("local", 5_000, 1_000_000, 0, 2 * HOUR);
        local.scope = VoucherScope::local_pools();
        assert_eq!(
            shares(&usage, &[voucher(local, 0)]),
            vec![("local".into(), 0, 5_000)]
        );
        let mut listed = spec("listed", 5_000, 1_000_000, 0, 2 * HOUR);
        listed.scope = VoucherScope::Pools(["guiyang-1".to_string()].into());
        assert_eq!(
            shares(&usage, &[voucher(listed, 0)]),
            vec![("listed".into(), 1, 5_000)]
        );
    }

    #[test]
    fn another_tenants_voucher_pays_nothing() {
        let usage = lease(0, HOUR, vec![part("p", PoolKind::LocalCentre, 10_000)]);
        let mut other = spec("other", 5_000, 1_000_000, 0, 2 * HOUR);
        other.tenant = "globex".into();
        assert!(shares(&usage, &[voucher(other, 0)]).is_empty());
    }

    #[test]
    fn invalid_vouchers_are_named() {
        let ok = spec("v", 5_000, 100, 0, 10);
        assert!(ok.validate().is_ok());
        let mut s = ok.clone();
        s.face_value = Fen(0);
        assert!(matches!(
            s.validate(),
            Err(BillingError::NotPositive {
                field: "face_value",
                ..
            })
        ));
        s.face_value = Fen(-5);
        assert!(matches!(
            s.validate(),
            Err(BillingError::NotPositive { .. })
        ));
        let mut s = ok.clone();
        s.rate_bp = 10_001;
        assert!(matches!(
            s.validate(),
            Err(BillingError::RateOutOfRange {
                rate_bp: 10_001,
                ..
            })
        ));
        s.rate_bp = 0;
        assert!(matches!(
            s.validate(),
            Err(BillingError::RateOutOfRange { .. })
        ));
        let mut s = ok.clone();
        s.valid_until = 0;
        assert!(matches!(
            s.validate(),
            Err(BillingError::ValidityEndsBeforeStart { .. })
        ));
        let mut s = ok.clone();
        s.scope = VoucherScope::PoolKinds(BTreeSet::new());
        assert!(matches!(s.validate(), Err(BillingError::EmptyScope { .. })));
        let mut s = ok.clone();
        s.per_lease_cap = Some(Fen(0));
        assert!(matches!(
            s.validate(),
            Err(BillingError::NotPositive {
                field: "per_lease_cap",
                ..
            })
        ));
        let mut s = ok;
        s.tenant.clear();
        assert!(matches!(s.validate(), Err(BillingError::EmptyField { .. })));
    }

    #[test]
    fn allocate_refuses_charges_that_do_not_match_the_parts() {
        let usage = lease(0, HOUR, vec![part("p", PoolKind::LocalCentre, 10_000)]);
        let v = voucher(spec("v", 5_000, 1_000, 0, HOUR), 0);
        assert!(matches!(
            allocate(&usage, &[], [&v]),
            Err(BillingError::InvalidLeasePart { .. })
        ));
        // A voucher built by hand with a rate over 100% still pays at most the charge.
        let (charges, total) = charge_lease(&usage).unwrap();
        let mut wild = voucher(spec("w", 5_000, 1_000_000, 0, HOUR), 0);
        wild.spec.rate_bp = 30_000;
        let shares = allocate(&usage, &charges, [&wild]).unwrap();
        assert_eq!(shares[0].amount, total);
    }

    #[test]
    fn scope_labels_for_reports() {
        assert_eq!(VoucherScope::AllPools.label(), "all");
        assert_eq!(
            VoucherScope::local_pools().label(),
            "kinds:local_centre;local_cloud"
        );
        assert_eq!(
            VoucherScope::Pools(["b".to_string(), "a".to_string()].into()).label(),
            "pools:a;b"
        );
    }
}
