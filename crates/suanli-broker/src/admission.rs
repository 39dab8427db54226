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
//!
//! Beside the buckets, a bound on the tenants' submissions and quotes in progress (cancels and
//! releases, which give capacity back, are not held to it): when that many already wait
//! for the writer, the broker is past what it can serve, and a new call is RESOURCE_EXHAUSTED
//! at once instead of joining a queue that only grows. A call it admits waits behind at most
//! that many in the writer's queue, however much is offered (it may still have waited in
//! HTTP/2 before reaching this point: see BENCHMARKS.md, "Overload"). No retry hint goes
//! with this refusal: it is not a tenant's rate, and calls told to come back together would
//! come back as one more wave.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
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
/// (none: no limit); and how many calls may be in progress in all.
#[derive(Clone, Debug, PartialEq)]
pub struct AdmissionConfig {
    /// The limit of a tenant without one of its own.
    pub default: Option<Limit>,
    /// Tenants' own limits.
    pub tenants: HashMap<String, Limit>,
    /// Most tenants' submissions and quotes in progress at once (`max_in_flight` in the file).
    pub max_in_flight: usize,
}

/// The default bound on calls in progress: a few times what the writer serves in one
/// group-commit batch under load, so batches stay full, and at about 20,000 calls a second
/// a wait of a fifth of a second at most.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 4096;

impl Default for AdmissionConfig {
    fn default() -> Self {
        AdmissionConfig {
            default: None,
            tenants: HashMap::new(),
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
        }
    }
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

/// The buckets, and the count of calls in progress.
#[derive(Debug)]
pub struct Admission {
    config: AdmissionConfig,
    buckets: DashMap<String, Bucket>,
    in_flight: AtomicUsize,
}

/// An admitted call in progress; dropping it (the call answered or abandoned) makes room.
#[must_use = "the call counts as in progress only while this is held"]
#[derive(Debug)]
pub struct Admitted<'a>(&'a AtomicUsize);

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Admission {
    /// Full buckets for every tenant, no call in progress.
    pub fn new(config: AdmissionConfig) -> Self {
        Admission {
            config,
            buckets: DashMap::new(),
            in_flight: AtomicUsize::new(0),
        }
    }

    /// Admits a call of `tenant` now, if the broker has room for it and the tenant a token;
    /// it counts as in progress until the returned guard is dropped.
    pub fn admit(&self, tenant: &str) -> Result<Admitted<'_>, BrokerError> {
        self.admit_at(tenant, Instant::now())
    }

    /// [`Admission::admit`] at `now`.
    pub fn admit_at(&self, tenant: &str, now: Instant) -> Result<Admitted<'_>, BrokerError> {
        // Room first: a call refused for the broker's load does not spend the tenant's token.
        let before = self.in_flight.fetch_add(1, Ordering::Relaxed);
        let admitted = Admitted(&self.in_flight);
        if before >= self.config.max_in_flight {
            return Err(BrokerError::Overloaded(
                "tenants' calls in progress at the bound",
            ));
        }
        self.take_token(tenant, now)?;
        Ok(admitted)
    }

    /// Admits a call of `tenant` that ends work (a cancel, a release): only the tenant's rate
    /// applies. Ending work gives capacity back and is cheap for the writer, so the bound on
    /// calls in progress never holds it back: under overload, refusing it would leave the
    /// fleet full and the queue long for longer.
    pub fn admit_ending(&self, tenant: &str) -> Result<(), BrokerError> {
        self.take_token(tenant, Instant::now())
    }

    /// Calls in progress now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Takes a token of `tenant`'s bucket at `now`, or says how long until there is one.
    fn take_token(&self, tenant: &str, now: Instant) -> Result<(), BrokerError> {
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

    /// Whether `tenant`'s call at `now` passes; the call ends at once.
    fn admit(a: &Admission, tenant: &str, now: Instant) -> Result<(), BrokerError> {
        a.admit_at(tenant, now).map(drop)
    }

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
            admit(&a, "flood", t0).unwrap();
        }
        let hint = |r: Result<(), BrokerError>| match r {
            Err(BrokerError::RateLimited { retry_after_ms, .. }) => retry_after_ms,
            other => panic!("refused with a hint, not {other:?}"),
        };
        // Calls refused together are told to come back one after another, at the rate.
        assert_eq!(hint(admit(&a, "flood", t0)), 100, "one token every 100 ms");
        assert_eq!(hint(admit(&a, "flood", t0)), 200);
        // Each comes back at its time and passes.
        admit(&a, "flood", t0 + Duration::from_millis(100)).unwrap();
        admit(&a, "flood", t0 + Duration::from_millis(200)).unwrap();
        assert_eq!(
            hint(admit(&a, "flood", t0 + Duration::from_millis(200))),
            100
        );
        // A client that ignores the hints is told to wait at most a minute more.
        let storm = t0 + Duration::from_secs(1);
        for _ in 0..100_000 {
            let _ = admit(&a, "flood", storm);
        }
        assert_eq!(hint(admit(&a, "flood", storm)), 60_100);
        // Others are not limited, and a quiet spell refills no more than the burst.
        for _ in 0..1000 {
            admit(&a, "quiet", t0).unwrap();
        }
        let much_later = t0 + Duration::from_secs(7200);
        for _ in 0..3 {
            admit(&a, "flood", much_later).unwrap();
        }
        assert!(admit(&a, "flood", much_later).is_err());
    }

    #[test]
    fn calls_beyond_the_bound_in_progress_are_refused_until_some_end() {
        let a = Admission::new(AdmissionConfig {
            max_in_flight: 3,
            ..AdmissionConfig::default()
        });
        let now = Instant::now();
        let held: Vec<_> = (0..3).map(|_| a.admit_at("t", now).unwrap()).collect();
        assert_eq!(a.in_flight(), 3);
        for _ in 0..5 {
            assert!(matches!(
                a.admit_at("u", now),
                Err(BrokerError::Overloaded(_))
            ));
        }
        // Refused calls take no room; an answered one gives its room back.
        assert_eq!(a.in_flight(), 3);
        drop(held);
        assert_eq!(a.in_flight(), 0);
        let again: Vec<_> = (0..3).map(|_| a.admit_at("u", now).unwrap()).collect();
        assert!(a.admit_at("t", now).is_err());
        drop(again);
    }

    #[test]
    fn a_call_refused_for_the_load_keeps_the_tenants_token() {
        let mut config = AdmissionConfig {
            max_in_flight: 1,
            ..AdmissionConfig::default()
        };
        config
            .tenants
            .insert("t".into(), Limit::new(1.0, Some(1.0)).unwrap());
        let a = Admission::new(config);
        let now = Instant::now();
        let busy = a.admit_at("other", now).unwrap();
        assert!(matches!(
            admit(&a, "t", now),
            Err(BrokerError::Overloaded(_))
        ));
        drop(busy);
        admit(&a, "t", now).unwrap();
    }

    #[test]
    fn a_limit_must_be_positive() {
        assert!(Limit::new(0.0, None).is_err());
        assert!(Limit::new(f64::NAN, None).is_err());
        assert_eq!(Limit::new(5.0, None).unwrap().burst, 10.0);
        assert_eq!(Limit::new(0.2, None).unwrap().burst, 1.0);
    }
}
