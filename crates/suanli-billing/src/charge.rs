//! What a lease costs: its usage (where it ran, on how many devices, at what price, for how
//! long) and the charge computed from it.
//!
//! The rule, for each part of a lease (one pool and node group):
//! 1. running time = `ended_at - started_at`, rounded **up** to the pool's billing increment when
//!    it has one (a lease that ran 61 s in a pool billing per started minute pays 120 s); a
//!    lease that never ran pays nothing, whatever the increment;
//! 2. amount = devices x price per device-hour x billed ms / 3 600 000, rounded to the fen,
//!    **half up**, computed exactly in `u128`.
//!
//! The lease's charge is the sum of its parts' amounts. Rounding each part (rather than the
//! lease) keeps every statement line, which is per model and pool kind, an exact sum of charges.

use std::fmt;

use serde::{Deserialize, Serialize};
use suanli_core::{Millis, PoolKind, Tflops};

use crate::error::BillingError;
use crate::money::{Fen, div_round_half_up, fen_from_u128};

/// Milliseconds in one hour, the unit of prices.
pub const MS_PER_HOUR: u64 = 3_600_000;

/// The broker's identifier of one lease. A request that is preempted and placed again gets a
/// new lease, so the broker names leases by request and attempt, e.g. `r17` or `r17#2`;
/// settlement is idempotent by this id.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LeaseId(pub String);

impl LeaseId {
    /// A lease id from anything string-like.
    pub fn new(id: impl Into<String>) -> LeaseId {
        LeaseId(id.into())
    }
}

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One part of a lease: devices of one model in one pool, at the price fixed when it was placed.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LeasePart {
    /// Pool id, e.g. `futian-aicc`.
    pub pool: String,
    /// Local centre, local cloud or external: what voucher scopes and reports look at.
    pub pool_kind: PoolKind,
    /// Accelerator model id, e.g. `ascend-910b`.
    pub model: String,
    /// Devices held, at least 1.
    pub devices: u64,
    /// Rated dense TFLOPS of all those devices together, for P-hours in statements.
    pub tflops: Tflops,
    /// Price of one device for one hour, fixed at placement.
    pub price_per_device_hour: Fen,
    /// The pool's minimum billing increment in ms (60 000 bills per started minute); `None`
    /// bills to the millisecond.
    pub billing_increment_ms: Option<Millis>,
}

/// What a lease used, as the broker reports it when the lease ended (or, for a quote, as it is
/// expected to run).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LeaseUsage {
    /// The lease.
    pub lease: LeaseId,
    /// The tenant that holds it.
    pub tenant: String,
    /// When it started running, unix ms. A lease that never ran has `started_at == ended_at`.
    pub started_at: Millis,
    /// When it stopped running, unix ms. Decides the statement month.
    pub ended_at: Millis,
    /// Where it ran; an elastic lease may span pools.
    pub parts: Vec<LeasePart>,
}

impl LeaseUsage {
    /// Running time in ms.
    pub fn running_ms(&self) -> Millis {
        self.ended_at.saturating_sub(self.started_at)
    }

    /// Checks names, times and parts; see [`BillingError`] for what is refused.
    pub fn validate(&self) -> Result<(), BillingError> {
        if self.lease.0.is_empty() {
            return Err(BillingError::EmptyField { field: "lease" });
        }
        if self.tenant.is_empty() {
            return Err(BillingError::EmptyField { field: "tenant" });
        }
        if self.ended_at < self.started_at {
            return Err(BillingError::LeaseEndsBeforeStart {
                lease: self.lease.clone(),
                started_at: self.started_at,
                ended_at: self.ended_at,
            });
        }
        if self.parts.is_empty() {
            return Err(BillingError::LeaseWithoutParts {
                lease: self.lease.clone(),
            });
        }
        for (i, part) in self.parts.iter().enumerate() {
            let invalid = |reason: String| BillingError::InvalidLeasePart {
                lease: self.lease.clone(),
                part: i,
                reason,
            };
            if part.pool.is_empty() {
                return Err(invalid("pool must not be empty".into()));
            }
            if part.model.is_empty() {
                return Err(invalid("model must not be empty".into()));
            }
            if part.devices == 0 {
                return Err(invalid("devices must be at least 1".into()));
            }
            if part.price_per_device_hour.is_negative() {
                return Err(invalid(format!(
                    "price_per_device_hour must not be negative, got {}",
                    part.price_per_device_hour
                )));
            }
            if part.billing_increment_ms == Some(0) {
                return Err(invalid(
                    "billing_increment_ms must be at least 1 ms when set".into(),
                ));
            }
        }
        Ok(())
    }
}

/// The charge of one part of a lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PartCharge {
    /// Running time after rounding up to the billing increment.
    pub billed_ms: Millis,
    /// What the part costs, before any subsidy.
    pub amount: Fen,
}

/// Running time rounded up to a whole number of increments (unchanged without an increment).
pub fn billed_ms(running_ms: Millis, increment_ms: Option<Millis>) -> Result<Millis, BillingError> {
    let overflow = BillingError::Overflow {
        what: "billed time",
    };
    match increment_ms {
        None | Some(1) => Ok(running_ms),
        Some(0) => Err(BillingError::Zero {
            field: "billing_increment_ms",
        }),
        Some(increment) => {
            let increments = running_ms.div_ceil(increment);
            increments.checked_mul(increment).ok_or(overflow)
        }
    }
}

/// The charge of devices at a price per device-hour for a billed time: rounded to the fen,
/// half up.
pub fn amount_for(
    devices: u64,
    price_per_device_hour: Fen,
    billed_ms: Millis,
) -> Result<Fen, BillingError> {
    if price_per_device_hour.is_negative() {
        return Err(BillingError::Negative {
            field: "price_per_device_hour",
            value: price_per_device_hour,
        });
    }
    let overflow = BillingError::Overflow {
        what: "lease charge",
    };
    let fen_ms = u128::from(devices)
        .checked_mul(price_per_device_hour.0 as u128)
        .and_then(|x| x.checked_mul(u128::from(billed_ms)))
        .ok_or(overflow.clone())?;
    let fen = div_round_half_up(fen_ms, u128::from(MS_PER_HOUR)).ok_or(overflow)?;
    fen_from_u128(fen, "lease charge")
}

/// The charges of a validated lease, part by part, and their total.
pub fn charge_lease(usage: &LeaseUsage) -> Result<(Vec<PartCharge>, Fen), BillingError> {
    usage.validate()?;
    let running = usage.running_ms();
    let mut parts = Vec::with_capacity(usage.parts.len());
    let mut total = Fen::ZERO;
    for part in &usage.parts {
        let billed = billed_ms(running, part.billing_increment_ms)?;
        let amount = amount_for(part.devices, part.price_per_device_hour, billed)?;
        total = total.checked_add(amount, "lease charge")?;
        parts.push(PartCharge {
            billed_ms: billed,
            amount,
        });
    }
    Ok((parts, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Millis = 60_000;
    const HOUR: Millis = MS_PER_HOUR;

    fn usage(running: Millis, devices: u64, price: i64, increment: Option<Millis>) -> LeaseUsage {
        LeaseUsage {
            lease: LeaseId::new("r1"),
            tenant: "acme".into(),
            started_at: 1_000,
            ended_at: 1_000 + running,
            parts: vec![LeasePart {
                pool: "futian-aicc".into(),
                pool_kind: PoolKind::LocalCentre,
                model: "ascend-910b".into(),
                devices,
                tflops: devices.saturating_mul(376),
                price_per_device_hour: Fen(price),
                billing_increment_ms: increment,
            }],
        }
    }

    #[test]
    fn running_time_rounds_up_to_the_increment() {
        assert_eq!(billed_ms(0, Some(MINUTE)).unwrap(), 0);
        assert_eq!(billed_ms(1, Some(MINUTE)).unwrap(), MINUTE);
        assert_eq!(billed_ms(MINUTE, Some(MINUTE)).unwrap(), MINUTE);
        assert_eq!(billed_ms(MINUTE + 1, Some(MINUTE)).unwrap(), 2 * MINUTE);
        assert_eq!(billed_ms(61 * MINUTE, Some(HOUR)).unwrap(), 2 * HOUR);
        assert_eq!(billed_ms(12_345, None).unwrap(), 12_345);
        assert!(billed_ms(u64::MAX, Some(HOUR)).is_err());
    }

    #[test]
    fn a_started_hour_is_billed_whole() {
        // 8 devices at ¥10.00/device-hour, 1 ms past the hour, billed per hour: two hours.
        let (parts, total) = charge_lease(&usage(HOUR + 1, 8, 1_000, Some(HOUR))).unwrap();
        assert_eq!(parts[0].billed_ms, 2 * HOUR);
        assert_eq!(total, Fen(16_000));
        // The same per minute: 61 minutes.
        let (_, total) = charge_lease(&usage(HOUR + 1, 8, 1_000, Some(MINUTE))).unwrap();
        // 8 x ¥10.00 x 61/60 h = ¥81.3333..: rounds to ¥81.33.
        assert_eq!(total, Fen(8_133));
    }

    #[test]
    fn amount_rounds_to_the_fen_half_up() {
        // 1 device at 1 fen/hour for half an hour: exactly 0.5 fen rounds up to 1.
        assert_eq!(amount_for(1, Fen(1), HOUR / 2).unwrap(), Fen(1));
        // One ms less than half: rounds down to 0.
        assert_eq!(amount_for(1, Fen(1), HOUR / 2 - 1).unwrap(), Fen(0));
        // 3 devices at 1 fen for 1/3 hour (20 minutes): exactly 1 fen.
        assert_eq!(amount_for(3, Fen(1), 20 * MINUTE).unwrap(), Fen(1));
        // 1 device at 999 fen for 1 minute: 16.65 -> 17.
        assert_eq!(amount_for(1, Fen(999), MINUTE).unwrap(), Fen(17));
        // 1 device at 997 fen for 1 minute: 16.6166.. -> 17; at 987: 16.45 -> 16.
        assert_eq!(amount_for(1, Fen(997), MINUTE).unwrap(), Fen(17));
        assert_eq!(amount_for(1, Fen(987), MINUTE).unwrap(), Fen(16));
    }

    #[test]
    fn a_lease_that_never_ran_costs_nothing() {
        let (parts, total) = charge_lease(&usage(0, 8, 1_000, Some(HOUR))).unwrap();
        assert_eq!(parts[0].billed_ms, 0);
        assert_eq!(total, Fen::ZERO);
    }

    #[test]
    fn huge_inputs_are_overflow_errors() {
        assert!(matches!(
            amount_for(u64::MAX, Fen(i64::MAX), u64::MAX),
            Err(BillingError::Overflow { .. })
        ));
        assert!(matches!(
            charge_lease(&usage(u64::MAX - 1_000, u64::MAX, i64::MAX, None)),
            Err(BillingError::Overflow { .. })
        ));
    }

    #[test]
    fn bad_usage_is_named() {
        let mut u = usage(HOUR, 1, 100, None);
        u.ended_at = 0;
        assert!(matches!(
            charge_lease(&u),
            Err(BillingError::LeaseEndsBeforeStart { .. })
        ));
        let mut u = usage(HOUR, 0, 100, None);
        assert!(matches!(
            charge_lease(&u),
            Err(BillingError::InvalidLeasePart { part: 0, .. })
        ));
        u = usage(HOUR, 1, -1, None);
        assert!(matches!(
            charge_lease(&u),
            Err(BillingError::InvalidLeasePart { .. })
        ));
        u = usage(HOUR, 1, 1, Some(0));
        assert!(matches!(
            charge_lease(&u),
            Err(BillingError::InvalidLeasePart { .. })
        ));
        u = usage(HOUR, 1, 1, None);
        u.parts.clear();
        assert!(matches!(
            charge_lease(&u),
            Err(BillingError::LeaseWithoutParts { .. })
        ));
        u = usage(HOUR, 1, 1, None);
        u.tenant.clear();
        assert_eq!(
            charge_lease(&u),
            Err(BillingError::EmptyField { field: "tenant" })
        );
    }
}
