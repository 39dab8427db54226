//! Accounting in the running broker: the ledger of `suanli-billing`, derived from the command
//! log.
//!
//! The engine is deterministic and the log is durable, so the ledger is not a second store:
//! the writer keeps a [`Ledger`] and changes it only as a consequence of logged entries,
//! applied in the same code on live apply and on replay:
//! - operators' billing commands ([`BillingOp`]: issue a voucher, set a budget) are log
//!   entries of their own (`Entry::Billing`), with the time they were applied at;
//! - a lease is settled when the engine reports that it ended (completed, released, cancelled
//!   or stopped while running, preempted, lost with its pool, or requeued: each placement is a
//!   lease of its own, `r{id}#{n}`), at the `now` of the logged command that ended it, never
//!   the wall clock. It runs from the time the broker recorded it started running (at placement
//!   on simulated pools, at the agent's report on agent pools) and is priced at the prices
//!   fixed on its parts at placement. A lease that never started running is not charged.
//!
//! Replay therefore re-derives the same ledger, and since settlement is idempotent by lease id
//! and each lease end is one logged consequence, every lease is charged exactly once across
//! crashes and restarts. Snapshots carry the ledger with the rest of the writer's state.
//!
//! Budgets are checked before a submission is logged (a refused submission is not logged, so
//! replay never re-checks one): what the tenant has paid in the budget's period plus what the
//! placement the engine would choose now would cost it after subsidy, for its whole estimated
//! duration. Leases still running are not held against the budget. A pool's billing increment
//! (`billing_increment_s` in its fleet entry or registration) is fixed on each lease part at
//! placement, with the price.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use suanli_billing::ledger::EntryKind;
use suanli_billing::{
    Budget, Fen, LeaseId, LeasePart, LeaseUsage, Ledger, Month, Voucher, VoucherSpec,
};
use suanli_core::{Command, Engine, RequestSpec, Subsidy};
use suanli_proto::v1 as pb;

use crate::error::BrokerError;

/// A broker-level accounting command, logged as it is applied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BillingOp {
    /// An operator issued a voucher.
    IssueVoucher(VoucherSpec),
    /// An operator set (or, with `None`, removed) a tenant's budget.
    SetBudget {
        /// The tenant.
        tenant: String,
        /// The budget.
        budget: Option<Budget>,
    },
    /// An operator set (or, with `None`, removed) the district's monthly subsidy budget.
    SetSubsidyBudget {
        /// Subsidy the district plans to spend per month.
        monthly: Option<Fen>,
    },
    /// An operator corrected what a tenant owes.
    Adjust {
        /// The tenant.
        tenant: String,
        /// Positive charges, negative credits.
        amount: Fen,
        /// Why.
        reason: String,
    },
}

/// The id of a request's `n`th lease (from 1) in the ledger.
pub fn lease_id(request: u64, n: u32) -> LeaseId {
    LeaseId::new(format!("r{request}#{n}"))
}

/// What a lease used, from its record as the broker kept it, ending at `ended_at`; `None` if
/// it never started running.
pub fn usage_of(engine: &Engine, record: &pb::Request, ended_at: u64) -> Option<LeaseUsage> {
    let lease = record.lease.as_ref()?;
    let started_at = lease.running_since_unix_ms?;
    Some(LeaseUsage {
        lease: lease_id(record.id, record.leases.max(1)),
        tenant: record.tenant.clone(),
        started_at,
        ended_at: ended_at.max(started_at),
        parts: parts_of(engine, lease),
    })
}

/// What a lease just placed would use if it ran from its placement to its expiry: what its
/// tenant's budget is held for.
pub fn placed_usage(engine: &Engine, record: &pb::Request) -> Option<LeaseUsage> {
    let lease = record.lease.as_ref()?;
    Some(LeaseUsage {
        lease: lease_id(record.id, record.leases.max(1)),
        tenant: record.tenant.clone(),
        started_at: lease.start_unix_ms,
        ended_at: lease.end_unix_ms.max(lease.start_unix_ms),
        parts: parts_of(engine, lease),
    })
}

/// A lease's parts for billing, one per node group (the nodes of a group share model, price
/// and increment), at the price and increment fixed on them at placement.
fn parts_of(engine: &Engine, lease: &pb::Lease) -> Vec<LeasePart> {
    /// Model, devices, price and increment of one node group's part.
    struct Group<'a> {
        model: &'a str,
        devices: u64,
        price: u64,
        increment_s: Option<u32>,
    }
    let mut groups: BTreeMap<(&str, u32), Group<'_>> = BTreeMap::new();
    for p in &lease.parts {
        groups
            .entry((p.pool.as_str(), p.group))
            .or_insert(Group {
                model: &p.model,
                devices: 0,
                price: p.price_fen_per_device_hour,
                increment_s: p.billing_increment_s,
            })
            .devices += u64::from(p.devices);
    }
    groups
        .into_iter()
        .map(|((pool, _), g)| lease_part(engine, pool, g.model, g.devices, g.price, g.increment_s))
        .collect()
}

/// One part of a lease for billing: `devices` of `model` in `pool` at `price` fen a device-hour,
/// billed by `increment_s`; its kind and TFLOPS from the engine's fleet and catalogue.
fn lease_part(
    engine: &Engine,
    pool: &str,
    model: &str,
    devices: u64,
    price: u64,
    increment_s: Option<u32>,
) -> LeasePart {
    let catalogue = engine.catalogue();
    let per_device = catalogue
        .lookup(model)
        .map_or(0, |ix| u64::from(catalogue.model(ix).fp16_dense_tflops));
    LeasePart {
        pool: pool.to_string(),
        pool_kind: engine
            .pool_spec(pool)
            .map_or(suanli_core::PoolKind::External, |s| s.kind),
        model: model.to_string(),
        devices,
        tflops: devices * per_device,
        price_per_device_hour: Fen(price as i64),
        billing_increment_ms: increment_s.map(|s| u64::from(s) * 1_000),
    }
}

/// The month before which the ledger's months should be folded in `month`: all but `month`
/// and the one before it, when an entry not folded yet is older than that; `None` when there
/// is nothing to fold.
pub fn months_to_close(ledger: &Ledger, month: Month) -> Option<Month> {
    let last_month = month.prev();
    let oldest_open = ledger
        .entries()
        .iter()
        .find(|e| !matches!(e.kind, EntryKind::Compacted { .. }))?;
    (Month::containing(oldest_open.at) < last_month).then_some(last_month)
}

/// What the engine was last told of tenants' vouchers (see [`Command::SetSubsidies`]), and
/// when it must be told again: for a tenant whose vouchers changed (one was issued, or paid
/// towards a lease and may have run out) and for everyone when a voucher's validity begins or
/// ends. The writer syncs before every command it applies, live and on replay, from the
/// ledger and the command's `now` alone, so replay tells the engine the same at the same
/// points and placement decides the same.
#[derive(Debug)]
pub struct Subsidies {
    /// Tenants to sync at the next command.
    dirty: BTreeSet<String>,
    /// Sync every tenant at the next command (after start or a snapshot).
    all: bool,
    /// The next time a voucher's validity begins or ends.
    next_change: u64,
}

impl Default for Subsidies {
    fn default() -> Self {
        Subsidies {
            dirty: BTreeSet::new(),
            all: true,
            next_change: 0,
        }
    }
}

impl Subsidies {
    /// A tenant's vouchers changed.
    pub fn changed(&mut self, tenant: &str) {
        if !self.all && !self.dirty.contains(tenant) {
            self.dirty.insert(tenant.to_string());
        }
    }

    /// The commands that bring the engine's view of vouchers up to date at `now`.
    pub fn sync(&mut self, ledger: &Ledger, engine: &Engine, now: u64) -> Vec<Command> {
        let all = self.all || now >= self.next_change;
        if !all && self.dirty.is_empty() {
            return Vec::new();
        }
        let dirty = std::mem::take(&mut self.dirty);
        self.all = false;
        // The next validity boundary after `now` among the vouchers looked at.
        let next_boundary = |vouchers: &mut dyn Iterator<Item = &Voucher>| {
            vouchers
                .flat_map(|v| [v.spec.valid_from, v.spec.valid_until])
                .filter(|&t| t > now)
                .min()
                .unwrap_or(u64::MAX)
        };
        let tenants: Vec<&str> = if all {
            self.next_change = next_boundary(&mut ledger.vouchers());
            let mut all: BTreeSet<&str> =
                ledger.vouchers().map(|v| v.spec.tenant.as_str()).collect();
            all.extend(dirty.iter().map(String::as_str));
            all.into_iter().collect()
        } else {
            let mut theirs = dirty.iter().flat_map(|t| ledger.vouchers_of(t));
            self.next_change = self.next_change.min(next_boundary(&mut theirs));
            dirty.iter().map(String::as_str).collect()
        };
        tenants
            .into_iter()
            .filter_map(|tenant| {
                let terms: Vec<Subsidy> = ledger
                    .vouchers_of(tenant)
                    .filter(|v| v.can_pay_at(now))
                    .map(Voucher::as_subsidy)
                    .collect();
                (engine.subsidies(tenant) != terms.as_slice()).then(|| Command::SetSubsidies {
                    tenant: tenant.to_string(),
                    subsidies: terms,
                })
            })
            .collect()
    }
}

/// The usage a quote's placement would have if it ran its whole duration from `now`.
pub fn quoted_usage(
    engine: &Engine,
    spec: &RequestSpec,
    placement: &suanli_core::QuotePlacement,
    now: u64,
) -> LeaseUsage {
    let parts = placement
        .parts
        .iter()
        .map(|p| {
            let pool = engine.pool_spec(&p.pool);
            let price = pool
                .and_then(|s| s.groups.get(p.group as usize))
                .map_or(0, |g| g.price_fen_per_device_hour);
            let increment_s = pool.and_then(|s| s.billing_increment_s);
            lease_part(engine, &p.pool, &p.model, p.devices, price, increment_s)
        })
        .collect();
    LeaseUsage {
        lease: LeaseId::new("quote"),
        tenant: spec.tenant.clone(),
        started_at: now,
        ended_at: now.saturating_add(spec.duration_ms),
        parts,
    }
}

/// The wire name of a field the accounting core names.
fn wire_field(field: &str) -> String {
    match field {
        "voucher" => "voucher.id".into(),
        "tenant" => "voucher.tenant".into(),
        "face_value" => "voucher.face_value_fen".into(),
        "per_lease_cap" => "voucher.per_lease_cap_fen".into(),
        "budget.limit" => "budget.limit_fen".into(),
        "subsidy_budget.monthly" => "monthly_fen".into(),
        "adjustment.amount" => "amount_fen".into(),
        other => other.into(),
    }
}

/// An accounting error as the caller sees it.
pub fn billing_error(e: suanli_billing::BillingError) -> BrokerError {
    use suanli_billing::BillingError as B;
    let text = e.to_string();
    match e {
        B::BudgetExceeded { .. } => BrokerError::FailedPrecondition(text),
        B::DuplicateVoucher { .. } => BrokerError::AlreadyExists(text),
        B::UnknownVoucher { .. } | B::VoucherOfOtherTenant { .. } => BrokerError::NotFound(text),
        B::EmptyField { field }
        | B::NotPositive { field, .. }
        | B::Zero { field }
        | B::Negative { field, .. } => BrokerError::field(wire_field(field), text),
        B::RateOutOfRange { .. } => BrokerError::field("voucher.rate_bp", text),
        B::ValidityEndsBeforeStart { .. } => {
            BrokerError::field("voucher.valid_until_unix_ms", text)
        }
        B::EmptyScope { .. } => BrokerError::field("voucher.scope", text),
        B::InvalidMonth { .. } => BrokerError::field("month", text),
        B::ReportTooLong { .. } => BrokerError::field("last_month", text),
        _ => BrokerError::FailedPrecondition(text),
    }
}

#[cfg(test)]
mod tests {
    use suanli_billing::{BillingError, VoucherId};
    use tonic::Code;

    use super::*;

    #[test]
    fn accounting_errors_get_the_code_and_the_wire_field() {
        let code = |e: BillingError| tonic::Status::from(billing_error(e));
        let s = code(BillingError::NotPositive {
            field: "face_value",
            value: Fen(0),
        });
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("voucher.face_value_fen"), "{s:?}");
        let s = code(BillingError::DuplicateVoucher {
            voucher: VoucherId::new("v"),
        });
        assert_eq!(s.code(), Code::AlreadyExists);
        let s = code(BillingError::BudgetExceeded {
            tenant: "t".into(),
            period: suanli_billing::BudgetPeriodLabel {
                period: suanli_billing::BudgetPeriod::Total,
                month: None,
            },
            limit: Fen(100),
            committed: Fen(0),
            requested: Fen(200),
        });
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert!(s.message().contains("total budget of ¥1.00"), "{s:?}");
    }

    #[test]
    fn a_lease_bills_from_when_it_ran_one_part_per_node_group() {
        let engine = Engine::new(Default::default(), suanli_core::Catalogue::builtin());
        let part = |node, devices| pb::LeasePart {
            pool: "p".into(),
            group: 0,
            model: "h100".into(),
            node,
            devices,
            price_fen_per_device_hour: 3_000,
            billing_increment_s: Some(60),
        };
        let mut record = pb::Request {
            id: 7,
            tenant: "t".into(),
            leases: 2,
            lease: Some(pb::Lease {
                parts: vec![part(0, 8), part(1, 4)],
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(usage_of(&engine, &record, 10), None, "it never ran");
        record.lease.as_mut().unwrap().running_since_unix_ms = Some(1_000);
        let usage = usage_of(&engine, &record, 3_601_000).unwrap();
        assert_eq!(usage.lease, LeaseId::new("r7#2"));
        assert_eq!(usage.running_ms(), 3_600_000);
        assert_eq!(usage.parts.len(), 1);
        assert_eq!(usage.parts[0].devices, 12);
        assert_eq!(usage.parts[0].tflops, 12 * 989);
        assert_eq!(suanli_billing::charge_lease(&usage).unwrap().1, Fen(36_000));
        // The increment fixed on the parts applies: 61 s bill as two started minutes.
        assert_eq!(usage.parts[0].billing_increment_ms, Some(60_000));
        let short = usage_of(&engine, &record, 62_000).unwrap();
        assert_eq!(short.running_ms(), 61_000);
        assert_eq!(
            suanli_billing::charge_lease(&short).unwrap().1,
            Fen(1_200),
            "12 devices x 30 yuan/h x 2 min"
        );
    }

    #[test]
    fn months_before_last_month_are_folded_once() {
        let month = |y, m| Month::new(y, m).unwrap();
        let at = |m: Month| u64::try_from(m.starts_at_ms()).unwrap() + 3_600_000;
        let mut ledger = Ledger::new();
        assert_eq!(
            months_to_close(&ledger, month(2025, 3)),
            None,
            "nothing to fold"
        );
        ledger
            .set_budget("t", Some(Budget::monthly(Fen(100))), at(month(2024, 12)))
            .unwrap();
        // December 2024 is last month in January: kept open.
        assert_eq!(months_to_close(&ledger, month(2025, 1)), None);
        // In February, December is folded: months before January.
        assert_eq!(
            months_to_close(&ledger, month(2025, 2)),
            Some(month(2025, 1))
        );
        let outcome = ledger.compact(month(2025, 1), at(month(2025, 2))).unwrap();
        assert!(outcome.compacted);
        assert_eq!(
            months_to_close(&ledger, month(2025, 2)),
            None,
            "folded once"
        );
        assert_eq!(
            months_to_close(&ledger, month(2025, 6)),
            None,
            "nothing open"
        );
        ledger.set_budget("t", None, at(month(2025, 2))).unwrap();
        assert_eq!(months_to_close(&ledger, month(2025, 3)), None);
        assert_eq!(
            months_to_close(&ledger, month(2025, 4)),
            Some(month(2025, 3))
        );
    }
}
