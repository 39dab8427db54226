//! Subsidies as placement sees them: what share of a pool's price a tenant's compute vouchers
//! pay, so that the policy "cheapest after subsidy" can rank node groups by what the tenant
//! itself would pay.
//!
//! The engine keeps no money. The accounting core decides which vouchers pay how much at
//! settlement; the shell (broker or simulator) tells the engine, per tenant, the rate and scope
//! of each voucher that can pay now ([`Engine::set_subsidies`](crate::Engine::set_subsidies)),
//! and updates it when a voucher is issued, runs out or expires. Ranking uses rates only: a
//! voucher with a little balance left ranks a group as if it paid its full rate, which is what
//! it pays on the next bill until it runs out.
//!
//! Vouchers pay one after another, each its rate of what is still uncovered, so the share a
//! tenant pays of a group's price is the product of `1 - rate` over the vouchers whose scope
//! covers the group's pool.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::error::CoreError;
use crate::fleet::{PoolKind, PoolSpec};

/// One voucher as placement sees it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Subsidy {
    /// Share of each bill it pays, in basis points, 1..=10000.
    pub rate_bp: u32,
    /// The pools it pays for.
    pub pools: SubsidyPools,
}

/// The pools a subsidy pays for.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SubsidyPools {
    /// Every pool.
    All,
    /// Pools of these kinds.
    Kinds(BTreeSet<PoolKind>),
    /// These pools, by id.
    Pools(BTreeSet<String>),
}

impl SubsidyPools {
    fn covers(&self, pool: &PoolSpec) -> bool {
        match self {
            SubsidyPools::All => true,
            SubsidyPools::Kinds(kinds) => kinds.contains(&pool.kind),
            SubsidyPools::Pools(ids) => ids.contains(&pool.id),
        }
    }
}

/// Parts per million of a price that a tenant pays itself with no subsidy.
pub(crate) const FULL_PRICE_PPM: u32 = 1_000_000;

/// One tenant's subsidies resolved against the fleet.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(crate) struct Discount {
    /// As the shell set them.
    pub terms: Vec<Subsidy>,
    /// For each node group, the part per million of its price the tenant pays itself.
    pub share_ppm: Vec<u32>,
    /// The distinct values of `share_ppm`, ascending: placement walks each model's price order
    /// once per value, so groups of one share compare by price alone.
    pub shares: Vec<u32>,
}

impl Discount {
    /// Checks the terms: each rate must be 1..=10000 basis points.
    pub fn validate(tenant: &str, terms: &[Subsidy]) -> Result<(), CoreError> {
        for (i, t) in terms.iter().enumerate() {
            if !(1..=10_000).contains(&t.rate_bp) {
                return Err(CoreError::InvalidSubsidy {
                    tenant: tenant.to_string(),
                    field: format!("subsidy[{i}].rate_bp"),
                    reason: format!("{} is out of range 1..=10000", t.rate_bp),
                });
            }
            if matches!(&t.pools, SubsidyPools::Kinds(k) if k.is_empty())
                || matches!(&t.pools, SubsidyPools::Pools(p) if p.is_empty())
            {
                return Err(CoreError::InvalidSubsidy {
                    tenant: tenant.to_string(),
                    field: format!("subsidy[{i}].pools"),
                    reason: "names no pool".to_string(),
                });
            }
        }
        Ok(())
    }

    /// Resolves terms against the groups of a fleet, given as the pool spec of each group.
    pub fn resolve<'a>(
        terms: Vec<Subsidy>,
        group_pools: impl Iterator<Item = &'a PoolSpec>,
    ) -> Self {
        let share_ppm: Vec<u32> = group_pools
            .map(|pool| {
                terms
                    .iter()
                    .filter(|t| t.pools.covers(pool))
                    .fold(FULL_PRICE_PPM, |share, t| {
                        // Exact in u64: share <= 1e6 and 10_000 - rate <= 1e4.
                        (u64::from(share) * u64::from(10_000 - t.rate_bp) / 10_000) as u32
                    })
            })
            .collect();
        let shares: BTreeSet<u32> = share_ppm.iter().copied().collect();
        Discount {
            terms,
            share_ppm,
            shares: shares.into_iter().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::pool;

    #[test]
    fn vouchers_pay_one_after_another_each_of_what_is_left() {
        let local = pool("l", PoolKind::LocalCentre, 1, &[("h100", 8, 1, 100)]);
        let far = pool("x", PoolKind::External, 30, &[("h100", 8, 1, 100)]);
        let terms = vec![
            Subsidy {
                rate_bp: 5_000,
                pools: SubsidyPools::Kinds([PoolKind::LocalCentre].into()),
            },
            Subsidy {
                rate_bp: 2_000,
                pools: SubsidyPools::All,
            },
        ];
        let d = Discount::resolve(terms, [&local, &far, &local].into_iter());
        // Local: half paid, then 20% of the other half: the tenant pays 40%.
        assert_eq!(d.share_ppm, vec![400_000, 800_000, 400_000]);
        assert_eq!(d.shares, vec![400_000, 800_000]);
        let by_id = Discount::resolve(
            vec![Subsidy {
                rate_bp: 10_000,
                pools: SubsidyPools::Pools(["x".to_string()].into()),
            }],
            [&local, &far].into_iter(),
        );
        assert_eq!(by_id.share_ppm, vec![FULL_PRICE_PPM, 0]);
    }

    #[test]
    fn bad_terms_name_the_tenant_and_the_field() {
        let bad = |t: Subsidy| Discount::validate("acme", &[t]).unwrap_err().to_string();
        assert_eq!(
            bad(Subsidy {
                rate_bp: 0,
                pools: SubsidyPools::All
            }),
            "tenant acme: field subsidy[0].rate_bp: 0 is out of range 1..=10000"
        );
        assert_eq!(
            bad(Subsidy {
                rate_bp: 10_001,
                pools: SubsidyPools::All
            }),
            "tenant acme: field subsidy[0].rate_bp: 10001 is out of range 1..=10000"
        );
        assert_eq!(
            bad(Subsidy {
                rate_bp: 50,
                pools: SubsidyPools::Kinds(BTreeSet::new())
            }),
            "tenant acme: field subsidy[0].pools: names no pool"
        );
    }
}
