//! The audit trail: which operator changed what, when, and with what outcome; and every failed
//! authentication.
//!
//! An operator's mutation is logged with its audit tag (the token's name, the RPC, the target)
//! around the entry it caused, or, when it was refused, as a refusal of its own; the trail is
//! what applying the log gives, so it cannot disagree with the state, and it is in every
//! snapshot. Failed authentications are not commands: a flood of them must not grow the log,
//! so the last [`AUTH_FAILURES_KEPT`] are kept in memory, each also logged as a warning and
//! counted in `/metrics`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

/// How many failed authentications are kept to be listed.
pub const AUTH_FAILURES_KEPT: usize = 10_000;

/// Who made an operator call, which one, and on what.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditTag {
    /// The name of the token presented (see [`crate::auth::TokenRecord::name`]).
    pub who: String,
    /// The RPC, such as `SetTenant`.
    pub rpc: String,
    /// What it acted on, such as `tenants/acme`.
    pub target: String,
}

/// One line of the trail.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// When (unix ms): when it was applied, or refused.
    pub at: u64,
    /// Who, which call, on what.
    pub tag: AuditTag,
    /// Empty when the call took effect; else why it was refused.
    pub refused: String,
}

/// A failed authentication: when, from where, why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthFailure {
    /// When (unix ms).
    pub at: u64,
    /// The caller's address, when known.
    pub peer: String,
    /// Why it was refused.
    pub reason: String,
}

#[derive(Default)]
struct Inner {
    records: RwLock<Vec<AuditRecord>>,
    failures: RwLock<VecDeque<AuthFailure>>,
    failures_total: AtomicU64,
}

/// The trail, shared by the writer, which appends to it as it applies the log, and the
/// services that read it.
#[derive(Clone, Default)]
pub struct Trail(Arc<Inner>);

impl Trail {
    /// Appends a record (the writer, as it applies a logged one).
    pub fn push(&self, record: AuditRecord) {
        self.0
            .records
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(record);
    }

    /// Every record, oldest first.
    pub fn records(&self) -> Vec<AuditRecord> {
        self.0
            .records
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Records from `since` (unix ms) on, from the `skip`th on, at most `limit`; and whether
    /// more follow.
    pub fn page(&self, since: u64, skip: usize, limit: usize) -> (Vec<AuditRecord>, bool) {
        let records = self.0.records.read().unwrap_or_else(|e| e.into_inner());
        let from = records.partition_point(|r| r.at < since);
        let mut page: Vec<AuditRecord> = records
            .iter()
            .skip(from + skip)
            .take(limit + 1)
            .cloned()
            .collect();
        let more = page.len() > limit;
        page.truncate(limit);
        (page, more)
    }

    /// Makes this trail a copy of `other` (a state rebuilt from the store) in one step.
    pub fn assign(&self, other: &Trail) {
        let copy = other.records();
        *self.0.records.write().unwrap_or_else(|e| e.into_inner()) = copy;
    }

    /// Records a failed authentication.
    pub fn auth_failed(&self, at: u64, peer: String, reason: String) {
        tracing::debug!(peer, reason, "authentication failed");
        self.0.failures_total.fetch_add(1, Ordering::Relaxed);
        let mut failures = self.0.failures.write().unwrap_or_else(|e| e.into_inner());
        if failures.len() == AUTH_FAILURES_KEPT {
            failures.pop_front();
        }
        failures.push_back(AuthFailure { at, peer, reason });
    }

    /// The failed authentications kept, from `since` on, oldest first.
    pub fn auth_failures(&self, since: u64) -> Vec<AuthFailure> {
        self.0
            .failures
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|f| f.at >= since)
            .cloned()
            .collect()
    }

    /// How many authentications failed since start.
    pub fn auth_failures_total(&self) -> u64 {
        self.0.failures_total.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(at: u64) -> AuditRecord {
        AuditRecord {
            at,
            tag: AuditTag {
                who: "operator:primary".into(),
                rpc: "DrainPool".into(),
                target: "pools/p1".into(),
            },
            refused: String::new(),
        }
    }

    #[test]
    fn pages_start_at_a_time_and_say_whether_more_follow() {
        let trail = Trail::default();
        for at in [10, 20, 30, 40] {
            trail.push(record(at));
        }
        let (page, more) = trail.page(15, 0, 2);
        assert_eq!(page.iter().map(|r| r.at).collect::<Vec<_>>(), [20, 30]);
        assert!(more);
        let (page, more) = trail.page(15, 2, 2);
        assert_eq!(page.iter().map(|r| r.at).collect::<Vec<_>>(), [40]);
        assert!(!more);
    }

    #[test]
    fn failed_authentications_are_counted_and_the_last_ones_kept() {
        let trail = Trail::default();
        for at in 0..(AUTH_FAILURES_KEPT as u64 + 5) {
            trail.auth_failed(at, "127.0.0.1:1".into(), "unknown token".into());
        }
        assert_eq!(trail.auth_failures_total(), AUTH_FAILURES_KEPT as u64 + 5);
        let kept = trail.auth_failures(0);
        assert_eq!(kept.len(), AUTH_FAILURES_KEPT);
        assert_eq!(kept[0].at, 5);
    }
}
