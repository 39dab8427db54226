//! Per-tenant admission: a token bucket per tenant in front of the writer, so that one tenant
//! flooding the API is refused early and cheaply instead of taking the writer's time from
//! everyone else.
//!
//! Each tenant has a rate (calls a second) and a burst (how many calls may come at once after
//! a quiet spell); a call that finds the bucket empty is RESOURCE_EXHAUSTED with
//! `grpc-retry-pushback-ms`, the time until a token is there, which the project's clients
//! honour. Only calls that reach the writer count (submit, cancel, release, quote); reads are
//! served from the views and cost the writer nothing. The buckets live in memory: a restart
//! starts them full.

use std::collections::HashMap;
use std::time::Instant;

use dashmap::DashMap;

use crate::error::BrokerError;

/// The longest a refused call is told to wait for those refused before it.
const MAX_WAIT_S: f64 = 60.0;

/// A tenant's limit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limit {
    /// Calls a second, on average.
    pub rate: f64,
    /// Most calls at once.
    pub burst: f64,
}

impl Limit {
    /// A limit of `rate` a second and `burst` at once (at least one call).
    pub fn new(rate: f64, burst: Option<f64>) -> Result<Limit, String> {
        if !(rate.is_finite() && rate > 0.0) {
            return Err(format!(
                "rate {rate}: must be a positive number of calls a second"
            ));
        }
        let burst = burst.unwrap_or(2.0 * rate).max(1.0);
        if !burst.is_finite() {
            return Err(format!("burst {burst}: must be a number of calls"));
        }
        Ok(Limit { rate, burst })
    }
}

/// Who gets which limit: tenants named in the configuration theirs, every other the default
/// (none: no limit).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AdmissionConfig {
    /// The limit of a tenant without one of its own.
    pub default: Option<Limit>,
    /// Tenants' own limits.
    pub tenants: HashMap<String, Limit>,
}

impl AdmissionConfig {
    /// The limit of `tenant`, if any.
    pub fn limit(&self, tenant: &str) -> Option<Limit> {
        self.tenants.get(tenant).copied().or(self.default)
    }
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    /// Calls told to wait, less those the rate has served since.
    waiting: f64,
    last: Instant,
}

/// The buckets.
#[derive(Debug)]
pub struct Admission {
    config: AdmissionConfig,
    buckets: DashMap<String, Bucket>,
}

impl Admission {
    /// Full buckets for every tenant.
    pub fn new(config: AdmissionConfig) -> Self {
        Admission {
            config,
            buckets: DashMap::new(),
        }
    }

    /// Takes a token of `tenant`'s bucket now, or says how long until there is one.
    pub fn admit(&self, tenant: &str) -> Result<(), BrokerError> {
        self.admit_at(tenant, Instant::now())
    }

    /// [`Admission::admit`] at `now`.
    pub fn admit_at(&self, tenant: &str, now: Instant) -> Result<(), BrokerError> {
        let Some(limit) = self.config.limit(tenant) else {
            return Ok(());
        };
        let mut bucket = self
            .buckets
            .entry(tenant.to_string())
            .or_insert_with(|| Bucket {
                tokens: limit.burst,
                waiting: 0.0,
                last: now,
            });
        let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * limit.rate).min(limit.burst);
        bucket.waiting = (bucket.waiting - elapsed * limit.rate).max(0.0);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        // The refused call is told to come back after those already told to wait, which are
        // served at the rate: many calls held back together come back one after another
        // rather than all at once. How many wait is bounded, so a client that ignores the
        // hints cannot put the tenant's next calls off for longer than that.
        let wait_s = (1.0 - bucket.tokens + bucket.waiting) / limit.rate;
        bucket.waiting = (bucket.waiting + 1.0).min(limit.rate * MAX_WAIT_S);
        Err(BrokerError::RateLimited {
            tenant: tenant.to_string(),
            rate: limit.rate,
            retry_after_ms: ((wait_s * 1000.0).ceil() as u64).max(1),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn limited(rate: f64, burst: f64) -> Admission {
        let mut config = AdmissionConfig::default();
        config
            .tenants
            .insert("flood".into(), Limit::new(rate, Some(burst)).unwrap());
        Admission::new(config)
    }

    #[test]
    fn a_burst_passes_then_the_rate_holds_with_a_hint_of_the_wait() {
        let a = limited(10.0, 3.0);
        let t0 = Instant::now();
        for _ in 0..3 {
            a.admit_at("flood", t0).unwrap();
        }
        let hint = |r: Result<(), BrokerError>| match r {
            Err(BrokerError::RateLimited { retry_after_ms, .. }) => retry_after_ms,
            other => panic!("refused with a hint, not {other:?}"),
        };
        // Calls refused together are told to come back one after another, at the rate.
        assert_eq!(hint(a.admit_at("flood", t0)), 100, "one token every 100 ms");
        assert_eq!(hint(a.admit_at("flood", t0)), 200);
        // Each comes back at its time and passes.
        a.admit_at("flood", t0 + Duration::from_millis(100))
            .unwrap();
        a.admit_at("flood", t0 + Duration::from_millis(200))
            .unwrap();
        assert_eq!(
            hint(a.admit_at("flood", t0 + Duration::from_millis(200))),
            100
        );
        // A client that ignores the hints is told to wait at most a minute more.
        let storm = t0 + Duration::from_secs(1);
        for _ in 0..100_000 {
            let _ = a.admit_at("flood", storm);
        }
        assert_eq!(hint(a.admit_at("flood", storm)), 60_100);
        // Others are not limited, and a quiet spell refills no more than the burst.
        for _ in 0..1000 {
            a.admit_at("quiet", t0).unwrap();
        }
        let much_later = t0 + Duration::from_secs(7200);
        for _ in 0..3 {
            a.admit_at("flood", much_later).unwrap();
        }
        assert!(a.admit_at("flood", much_later).is_err());
    }

    #[test]
    fn a_limit_must_be_positive() {
        assert!(Limit::new(0.0, None).is_err());
        assert!(Limit::new(f64::NAN, None).is_err());
        assert_eq!(Limit::new(5.0, None).unwrap().burst, 10.0);
        assert_eq!(Limit::new(0.2, None).unwrap().burst, 1.0);
    }
}
