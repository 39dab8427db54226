//! What a run costs and what a subsidy policy pays for it, by the rules of `suanli-billing`,
//! the accounting the broker keeps.
//!
//! A [`SubsidyPolicy`] says what compute voucher (算力券) every tenant of the workload receives
//! when the run starts: the share of each bill it pays, the pools it pays on, its face value
//! (unlimited when not given) and an optional cap per lease; it is valid for the whole run.
//! Without a policy no voucher is issued: every lease is still charged, and the subsidy is 0.
//!
//! Every lease that ends (completed, preempted, lost: each attempt of a request is its own
//! lease, named like the broker names them, `r17` then `r17#2`) is settled with its running
//! time (placement to end: the simulator confirms every lease at once) and its parts, one per
//! node group, at the group's price per device-hour from the fleet file. The simulator never
//! changes a price, so that is the price the engine fixed at placement (the engine's lease
//! carries only the total price per hour; the per-part prices come from the layout), with the
//! pool's billing increment from the fleet file.
//!
//! The vouchers' rates and scopes are also given to the engine, and taken back when a voucher
//! runs out, so that the placement policy "cheapest after subsidy" ranks pools by what each
//! tenant pays there.
//!
//! Settling applies the functions a ledger settlement is made of, [`charge_lease`] and
//! [`allocate`], to the vouchers kept here, and adds up the bills; it does not append to a
//! `suanli_billing::Ledger`. A ledger keeps every entry and every settled lease (about a
//! kilobyte each) and checks each batch again as it applies it: for a run of a million jobs
//! that tripled the run time and would hold a gigabyte. What a run needs, the sums and the
//! vouchers' balances, is the same to the fen; a test settles the same leases through a
//! `Ledger` and compares.

use std::fmt;

use rustc_hash::FxHashMap;
use suanli_billing::voucher::allocate;
use suanli_billing::{
    BillingError, FULL_RATE_BP, LeaseId, LeasePart, LeaseUsage, Voucher, VoucherId, VoucherSpec,
    charge_lease,
};
pub use suanli_billing::{Fen, VoucherScope};
use suanli_core::{Millis, PoolKind, RequestId};

use crate::error::SimError;
use crate::layout::Layout;

/// The pool kinds, in the order of [`BillingFigures::subsidy_by_kind`].
pub const POOL_KINDS: [PoolKind; 3] = [
    PoolKind::LocalCentre,
    PoolKind::LocalCloud,
    PoolKind::External,
];

/// The voucher every tenant receives at the start of a run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubsidyPolicy {
    /// Share of each bill the voucher pays, in basis points (5000 = 50%), 1..=10000.
    pub rate_bp: u32,
    /// Pools it pays on.
    pub scope: VoucherScope,
    /// Face value of each tenant's voucher; `None` = unlimited.
    pub per_tenant: Option<Fen>,
    /// Most it pays towards one lease; `None` = no cap.
    pub per_lease_cap: Option<Fen>,
}

impl SubsidyPolicy {
    /// A policy from `RATE[@SCOPE]` (see [`parse_rate`] and [`parse_scope`]; the scope is
    /// `all` when not given), unlimited and uncapped.
    pub fn parse(text: &str) -> Result<SubsidyPolicy, SimError> {
        let (rate, scope) = match text.split_once('@') {
            Some((rate, scope)) => (rate, Some(scope)),
            None => (text, None),
        };
        let rate_bp = parse_rate(rate).map_err(|e| SimError::option("subsidy", e))?;
        let scope = match scope {
            Some(s) => parse_scope(s).map_err(|e| SimError::option("subsidy", e))?,
            None => VoucherScope::AllPools,
        };
        Ok(SubsidyPolicy {
            rate_bp,
            scope,
            per_tenant: None,
            per_lease_cap: None,
        })
    }

    /// Checks the policy; errors name the option at fault.
    pub fn validate(&self) -> Result<(), SimError> {
        if self.rate_bp == 0 || self.rate_bp > FULL_RATE_BP {
            return Err(SimError::option(
                "subsidy",
                format!(
                    "rate must be above 0% and at most 100%, got {} bp",
                    self.rate_bp
                ),
            ));
        }
        if matches!(&self.scope, VoucherScope::PoolKinds(k) if k.is_empty())
            || matches!(&self.scope, VoucherScope::Pools(p) if p.is_empty())
        {
            return Err(SimError::option("subsidy", "the scope names no pool"));
        }
        if let Some(face) = self.per_tenant
            && !face.is_positive()
        {
            return Err(SimError::option(
                "subsidy_per_tenant",
                format!("must be above zero, got {face}"),
            ));
        }
        if let Some(cap) = self.per_lease_cap
            && !cap.is_positive()
        {
            return Err(SimError::option(
                "subsidy_cap_per_lease",
                format!("must be above zero, got {cap}"),
            ));
        }
        Ok(())
    }
}

impl fmt::Display for SubsidyPolicy {
    /// E.g. `50% on local pools, ¥10000.00 per tenant, at most ¥500.00 per lease`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pct = self.rate_bp as f64 / 100.0;
        write!(f, "{pct}% on ")?;
        match &self.scope {
            VoucherScope::AllPools => write!(f, "all pools")?,
            s if *s == VoucherScope::local_pools() => write!(f, "local pools")?,
            VoucherScope::PoolKinds(kinds) => {
                let names: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
                write!(f, "{} pools", names.join("+"))?
            }
            VoucherScope::Pools(pools) => {
                let names: Vec<&str> = pools.iter().map(String::as_str).collect();
                write!(f, "pools {}", names.join("+"))?
            }
        }
        match self.per_tenant {
            Some(face) => write!(f, ", {face} per tenant")?,
            None => write!(f, ", unlimited")?,
        }
        if let Some(cap) = self.per_lease_cap {
            write!(f, ", at most {cap} per lease")?;
        }
        Ok(())
    }
}

/// A subsidy rate: a percentage (`50%`, `12.5%`) or a fraction (`0.5`, `1`), above 0 and at
/// most 100%, to the basis point (0.01%).
pub fn parse_rate(text: &str) -> Result<u32, String> {
    let t = text.trim();
    let (number, scale) = match t.strip_suffix('%') {
        Some(n) => (n.trim(), 2),
        None => (t, 4),
    };
    let bp = parse_decimal(number, scale)
        .ok_or_else(|| format!("rate {text:?} is not a percentage like 50% or a fraction like 0.5 (at most 0.01% precision)"))?;
    if bp == 0 || bp > u64::from(FULL_RATE_BP) {
        return Err(format!("rate {text:?} must be above 0% and at most 100%"));
    }
    Ok(bp as u32)
}

/// A voucher scope: `all`, `local` (the local centre and clouds), or pool kinds joined by `,`
/// or `+` (`local_centre`, `local_cloud`, `external`).
pub fn parse_scope(text: &str) -> Result<VoucherScope, String> {
    match text.trim() {
        "all" => return Ok(VoucherScope::AllPools),
        "local" => return Ok(VoucherScope::local_pools()),
        _ => {}
    }
    let mut kinds = std::collections::BTreeSet::new();
    for name in text.split([',', '+']).map(str::trim) {
        let kind = POOL_KINDS
            .into_iter()
            .find(|k| k.as_str() == name)
            .ok_or_else(|| {
                format!(
                    "scope {name:?} is not all, local, or a list of local_centre, local_cloud, external"
                )
            })?;
        kinds.insert(kind);
    }
    Ok(VoucherScope::PoolKinds(kinds))
}

/// An amount of yuan with at most two decimals (`10000`, `99.5`), above zero.
pub fn parse_yuan(text: &str) -> Result<Fen, String> {
    let fen = parse_decimal(text.trim(), 2)
        .ok_or_else(|| format!("{text:?} is not an amount of yuan like 10000 or 99.50"))?;
    let fen = i64::try_from(fen).map_err(|_| format!("{text:?} is too large"))?;
    if fen == 0 {
        return Err(format!("{text:?} must be above zero"));
    }
    Ok(Fen(fen))
}

/// A non-negative decimal with at most `scale` decimals, times 10^scale, exactly.
fn parse_decimal(text: &str, scale: u32) -> Option<u64> {
    let (whole, frac) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && frac.is_empty()) || !digits(whole) || !digits(frac) {
        return None;
    }
    if frac.len() > scale as usize {
        return None;
    }
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let frac_value: u64 = if frac.is_empty() {
        0
    } else {
        frac.parse().ok()?
    };
    let pad = 10u64.pow(scale - frac.len() as u32);
    whole
        .checked_mul(10u64.pow(scale))?
        .checked_add(frac_value * pad)
}

/// One part of a lease as the recorder keeps it: a node group (index in the layout) and the
/// devices held there.
pub type BilledPart = (u32, u64);

/// A run's accounts: each tenant's voucher and the sums of the bills.
#[derive(Clone, Debug)]
pub struct Billing {
    policy: Option<SubsidyPolicy>,
    vouchers: Vec<Voucher>,
    voucher_of: FxHashMap<String, usize>,
    /// One lease part per node group of the layout, with its pool, kind, model and price.
    templates: Vec<LeasePart>,
    /// The usage of the lease being settled, reused so settling allocates little.
    usage: LeaseUsage,
    cost: Fen,
    subsidy: Fen,
    tenant_paid: Fen,
    subsidy_by_kind: [Fen; 3],
    leases: u64,
    open_at_end: u64,
    error: Option<BillingError>,
    /// Tenants whose voucher ran out since [`Billing::take_exhausted`] was last called, so the
    /// run can tell placement they no longer have it.
    exhausted: Vec<String>,
}

/// A run's billing figures, exact in fen.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BillingFigures {
    /// Sum of lease charges.
    pub cost: Fen,
    /// Sum of voucher debits.
    pub subsidy: Fen,
    /// Sum of what tenants pay themselves.
    pub tenant_paid: Fen,
    /// Subsidy by pool kind, in the order of [`POOL_KINDS`].
    pub subsidy_by_kind: [Fen; 3],
    /// Vouchers issued.
    pub vouchers_issued: u64,
    /// Vouchers with nothing left at the end.
    pub vouchers_exhausted: u64,
    /// Leases settled.
    pub leases: u64,
    /// Of those, leases still held when the run ended, settled at its end.
    pub open_at_end: u64,
}

impl Billing {
    /// Accounts for a fleet, without vouchers.
    pub fn new(layout: &Layout) -> Self {
        let templates =
            layout
                .groups
                .iter()
                .map(|g| LeasePart {
                    pool: layout.pool_ids[g.pool as usize].clone(),
                    pool_kind: layout.pool_kind[g.pool as usize],
                    model: layout.model_ids[g.model as usize].clone(),
                    devices: 1,
                    tflops: g.device_tflops,
                    // Fleet prices are validated to fit; a price beyond i64 (no fleet has one) is
                    // refused by validation at settlement, as negative.
                    price_per_device_hour: Fen(
                        i64::try_from(g.price_fen_per_device_hour).unwrap_or(-1)
                    ),
                    billing_increment_ms: g.billing_increment_ms,
                })
                .collect();
        Billing {
            policy: None,
            vouchers: Vec::new(),
            voucher_of: FxHashMap::default(),
            templates,
            usage: LeaseUsage {
                lease: LeaseId::new(String::new()),
                tenant: String::new(),
                started_at: 0,
                ended_at: 0,
                parts: Vec::new(),
            },
            cost: Fen::ZERO,
            subsidy: Fen::ZERO,
            tenant_paid: Fen::ZERO,
            subsidy_by_kind: [Fen::ZERO; 3],
            leases: 0,
            open_at_end: 0,
            error: None,
            exhausted: Vec::new(),
        }
    }

    /// Issues each tenant its voucher under `policy` at `now`, valid for the whole run.
    pub fn open(
        &mut self,
        policy: &SubsidyPolicy,
        tenants: &[String],
        now: Millis,
    ) -> Result<(), SimError> {
        policy.validate()?;
        // "Unlimited" is a face value no run can spend, small enough that the face values of
        // all tenants still add up in a ledger's totals without overflow.
        let unlimited = Fen(i64::MAX / (tenants.len() as i64).max(1) / 2);
        for (i, tenant) in tenants.iter().enumerate() {
            let spec = VoucherSpec {
                id: VoucherId::new(format!("sim-{i}")),
                tenant: tenant.clone(),
                face_value: policy.per_tenant.unwrap_or(unlimited),
                rate_bp: policy.rate_bp,
                per_lease_cap: policy.per_lease_cap,
                scope: policy.scope.clone(),
                valid_from: 0,
                valid_until: Millis::MAX,
            };
            spec.validate()?;
            if self.voucher_of.contains_key(tenant) {
                return Err(SimError::option(
                    "subsidy",
                    format!("tenant {tenant:?} appears twice in the workload"),
                ));
            }
            self.voucher_of.insert(tenant.clone(), self.vouchers.len());
            self.vouchers.push(Voucher {
                spec,
                issued_at: now,
                issue_seq: i as u64,
                used: Fen::ZERO,
            });
        }
        self.policy = Some(policy.clone());
        Ok(())
    }

    /// Tenants whose voucher ran out since the last call.
    pub fn take_exhausted(&mut self) -> Vec<String> {
        std::mem::take(&mut self.exhausted)
    }

    /// The policy the vouchers were issued under.
    pub fn policy(&self) -> Option<&SubsidyPolicy> {
        self.policy.as_ref()
    }

    /// The vouchers, in order of issue, with what they paid.
    pub fn vouchers(&self) -> &[Voucher] {
        &self.vouchers
    }

    /// Settles one lease of `tenant` that ran from `started_at` to `ended_at` on `parts`;
    /// `open` marks a lease cut off by the end of the run. An error (an overflow) stops the
    /// accounting and is returned by [`Billing::figures`].
    #[allow(clippy::too_many_arguments)]
    pub fn settle(
        &mut self,
        request: RequestId,
        attempt: u32,
        tenant: &str,
        started_at: Millis,
        ended_at: Millis,
        parts: &[BilledPart],
        open: bool,
    ) {
        if self.error.is_some() {
            return;
        }
        if let Err(e) = self.try_settle(request, attempt, tenant, started_at, ended_at, parts) {
            self.error = Some(e);
            return;
        }
        self.open_at_end += u64::from(open);
    }

    fn try_settle(
        &mut self,
        request: RequestId,
        attempt: u32,
        tenant: &str,
        started_at: Millis,
        ended_at: Millis,
        parts: &[BilledPart],
    ) -> Result<(), BillingError> {
        use std::fmt::Write as _;
        let u = &mut self.usage;
        // The name of `lease_id`, written into the reused buffer.
        u.lease.0.clear();
        let _ = write!(u.lease.0, "{request}");
        if attempt > 1 {
            let _ = write!(u.lease.0, "#{attempt}");
        }
        u.tenant.clear();
        u.tenant.push_str(tenant);
        u.started_at = started_at;
        u.ended_at = ended_at.max(started_at);
        let mut n = 0;
        for &(g, devices) in parts {
            let Some(t) = self.templates.get(g as usize) else {
                continue;
            };
            if n == u.parts.len() {
                u.parts.push(t.clone());
            }
            // Field by field, so the strings keep their allocations.
            let p = &mut u.parts[n];
            p.pool.clone_from(&t.pool);
            p.model.clone_from(&t.model);
            p.pool_kind = t.pool_kind;
            p.price_per_device_hour = t.price_per_device_hour;
            p.billing_increment_ms = t.billing_increment_ms;
            p.devices = devices;
            p.tflops = devices * t.tflops;
            n += 1;
        }
        u.parts.truncate(n);
        if n == 0 {
            // Nothing of the lease maps to the fleet: nothing to charge.
            return Ok(());
        }
        let (charges, charge) = charge_lease(u)?;
        let voucher = self.voucher_of.get(tenant).map(|&i| &self.vouchers[i]);
        let shares = allocate(u, &charges, voucher)?;
        let mut subsidy = Fen::ZERO;
        let mut by_kind = self.subsidy_by_kind;
        for share in &shares {
            subsidy = subsidy.checked_add(share.amount, "lease subsidy")?;
            let kind = u.parts[share.part as usize].pool_kind;
            let k = POOL_KINDS.iter().position(|&p| p == kind).unwrap_or(2);
            by_kind[k] = by_kind[k].checked_add(share.amount, "subsidy by pool kind")?;
        }
        let due = charge.checked_sub(subsidy, "tenant due")?;
        let cost = self.cost.checked_add(charge, "run cost")?;
        let total_subsidy = self.subsidy.checked_add(subsidy, "run subsidy")?;
        let paid = self.tenant_paid.checked_add(due, "run tenant paid")?;
        if let Some(&i) = self.voucher_of.get(tenant) {
            // `allocate` never pays beyond the remaining balance, so this cannot overflow.
            let v = &mut self.vouchers[i];
            v.used = v.used.checked_add(subsidy, "voucher used")?;
            if subsidy.is_positive() && !v.remaining().is_positive() {
                self.exhausted.push(v.spec.tenant.clone());
            }
        }
        self.cost = cost;
        self.subsidy = total_subsidy;
        self.tenant_paid = paid;
        self.subsidy_by_kind = by_kind;
        self.leases += 1;
        Ok(())
    }

    /// The figures so far, or the error that stopped the accounting.
    pub fn figures(&self) -> Result<BillingFigures, BillingError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        Ok(BillingFigures {
            cost: self.cost,
            subsidy: self.subsidy,
            tenant_paid: self.tenant_paid,
            subsidy_by_kind: self.subsidy_by_kind,
            vouchers_issued: self.vouchers.len() as u64,
            vouchers_exhausted: self
                .vouchers
                .iter()
                .filter(|v| !v.remaining().is_positive())
                .count() as u64,
            leases: self.leases,
            open_at_end: self.open_at_end,
        })
    }
}

/// The broker's name of attempt `attempt` (from 1) of request `request`: `r17`, `r17#2`.
pub fn lease_id(request: suanli_core::RequestId, attempt: u32) -> LeaseId {
    if attempt <= 1 {
        LeaseId::new(request.to_string())
    } else {
        LeaseId::new(format!("{request}#{attempt}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use suanli_billing::Ledger;
    use suanli_core::{Catalogue, Fleet};

    fn layout() -> Layout {
        let text = "name = \"t\"\n\
            [[pool]]\nid = \"centre\"\nkind = \"local_centre\"\nregion = \"r\"\nrtt_ms = 1\n\
            data_zone = \"mainland\"\n[[pool.group]]\nmodel = \"h800\"\ndevices_per_node = 8\n\
            nodes = 2\ninterconnect = \"nvlink\"\nprice_fen_per_device_hour = 1000\n\
            [[pool]]\nid = \"far\"\nkind = \"external\"\nregion = \"r\"\nrtt_ms = 30\n\
            data_zone = \"mainland\"\n[[pool.group]]\nmodel = \"a800\"\ndevices_per_node = 8\n\
            nodes = 2\ninterconnect = \"nvlink\"\nprice_fen_per_device_hour = 700\n";
        let catalogue = Catalogue::builtin();
        Layout::new(&Fleet::from_toml(text, &catalogue).unwrap(), &catalogue)
    }

    #[test]
    fn policies_parse_and_bad_values_name_the_option() {
        let p = SubsidyPolicy::parse("50%@local").unwrap();
        assert_eq!(p.rate_bp, 5_000);
        assert_eq!(p.scope, VoucherScope::local_pools());
        assert_eq!(p.to_string(), "50% on local pools, unlimited");
        let p = SubsidyPolicy::parse("0.125").unwrap();
        assert_eq!((p.rate_bp, &p.scope), (1_250, &VoucherScope::AllPools));
        let p = SubsidyPolicy::parse("100%@external+local_cloud").unwrap();
        assert_eq!(
            p.scope,
            VoucherScope::PoolKinds([PoolKind::External, PoolKind::LocalCloud].into())
        );
        for bad in [
            "0%", "101%", "1.5", "-5%", "50%@mars", "x", "", "50%@", "0.00001",
        ] {
            assert!(
                matches!(
                    SubsidyPolicy::parse(bad),
                    Err(SimError::Option {
                        option: "subsidy",
                        ..
                    })
                ),
                "{bad:?} was accepted"
            );
        }
        assert_eq!(parse_yuan("99.5"), Ok(Fen(9_950)));
        assert_eq!(parse_yuan("10000"), Ok(Fen(1_000_000)));
        for bad in ["0", "1.234", "-1", "ten", "99999999999999999999"] {
            assert!(parse_yuan(bad).is_err(), "{bad:?} was accepted");
        }
        let mut p = SubsidyPolicy::parse("50%").unwrap();
        p.per_tenant = Some(Fen(0));
        assert!(matches!(
            p.validate(),
            Err(SimError::Option {
                option: "subsidy_per_tenant",
                ..
            })
        ));
        p.per_tenant = Some(Fen(100));
        p.per_lease_cap = Some(Fen(-1));
        assert!(matches!(
            p.validate(),
            Err(SimError::Option {
                option: "subsidy_cap_per_lease",
                ..
            })
        ));
    }

    #[test]
    fn lease_ids_follow_the_broker() {
        assert_eq!(lease_id(RequestId(17), 1).0, "r17");
        assert_eq!(lease_id(RequestId(17), 2).0, "r17#2");
    }

    /// A few hundred leases of three tenants (one without a voucher) on both pools, some that
    /// never ran, settled by the run's accounts and by a `Ledger` with the same vouchers.
    fn both(policy: &SubsidyPolicy) -> (Billing, Ledger) {
        let layout = layout();
        let tenants = ["a".to_string(), "b".to_string()];
        let mut b = Billing::new(&layout);
        b.open(policy, &tenants, 0).unwrap();
        let mut ledger = Ledger::new();
        for v in b.vouchers() {
            ledger.issue_voucher(v.spec.clone(), 0).unwrap();
        }
        for i in 0..300u64 {
            // Tenant a runs four times as many leases as b.
            let tenant = ["a", "a", "b", "a", "c", "a"][(i % 6) as usize];
            let parts: Vec<BilledPart> = match i % 4 {
                0 => vec![(0, 8)],
                1 => vec![(1, 3)],
                _ => vec![(0, 2), (1, 1 + i % 5)],
            };
            let start = i * 1_000;
            let end = if i % 50 == 7 {
                start
            } else {
                start + 600_000 + i * 7_919
            };
            let attempt = 1 + (i % 2) as u32;
            b.settle(RequestId(i), attempt, tenant, start, end, &parts, false);
            let usage = LeaseUsage {
                lease: lease_id(RequestId(i), attempt),
                tenant: tenant.into(),
                started_at: start,
                ended_at: end,
                parts: parts
                    .iter()
                    .map(|&(g, devices)| {
                        let group = &layout.groups[g as usize];
                        LeasePart {
                            pool: layout.pool_ids[group.pool as usize].clone(),
                            pool_kind: layout.pool_kind[group.pool as usize],
                            model: layout.model_ids[group.model as usize].clone(),
                            devices,
                            tflops: devices * group.device_tflops,
                            price_per_device_hour: Fen(group.price_fen_per_device_hour as i64),
                            billing_increment_ms: group.billing_increment_ms,
                        }
                    })
                    .collect(),
            };
            ledger.settle(usage, end).unwrap();
        }
        (b, ledger)
    }

    #[test]
    fn the_run_accounts_agree_with_a_ledger_to_the_fen() {
        let mut capped = SubsidyPolicy::parse("60%@local").unwrap();
        capped.per_tenant = Some(Fen(40_000));
        capped.per_lease_cap = Some(Fen(500));
        let mut full = SubsidyPolicy::parse("100%@all").unwrap();
        full.per_tenant = Some(Fen(1_000_000));
        for policy in [capped, full, SubsidyPolicy::parse("25%").unwrap()] {
            let (b, ledger) = both(&policy);
            let f = b.figures().unwrap();
            let t = ledger.totals();
            assert!(f.subsidy.is_positive(), "{policy}");
            assert_eq!(
                (f.cost, f.subsidy, f.tenant_paid),
                (t.charges, t.voucher_debits, t.tenant_dues),
                "{policy}"
            );
            assert_eq!(f.leases, ledger.settlements().count() as u64);
            for v in b.vouchers() {
                assert_eq!(ledger.voucher(&v.spec.id).unwrap().used, v.used, "{policy}");
            }
            let mut by_kind = [Fen::ZERO; 3];
            for s in ledger.settlements() {
                for share in &s.bill.vouchers {
                    let kind = s.bill.usage.parts[share.part as usize].pool_kind;
                    let k = POOL_KINDS.iter().position(|&p| p == kind).unwrap();
                    by_kind[k] = Fen(by_kind[k].0 + share.amount.0);
                }
            }
            assert_eq!(f.subsidy_by_kind, by_kind, "{policy}");
        }
        // The capped policy: tenant a's voucher runs out, tenant b's does not; nothing is paid
        // on the external pool.
        let mut capped = SubsidyPolicy::parse("60%@local").unwrap();
        capped.per_tenant = Some(Fen(40_000));
        capped.per_lease_cap = Some(Fen(500));
        let f = both(&capped).0.figures().unwrap();
        assert_eq!((f.vouchers_issued, f.vouchers_exhausted), (2, 1));
        assert_eq!(f.subsidy_by_kind[2], Fen::ZERO);
    }
}
