//! Several brokers on one etcd cluster: one leader runs the writer, the others follow.
//!
//! A broker started with etcd endpoints is one replica of a group. The replicas campaign for
//! one lease-bound key in etcd; the key's creation revision is the winner's term. The leader
//! appends each group-commit batch to the log in etcd in a transaction guarded by its term
//! (see [`log`]), so a leader that lost its lease without knowing it (paused, cut off) cannot
//! append: that is the fencing. Followers watch the log and apply every batch to their own
//! engine, which is deterministic, so their state is the leader's at the same log position;
//! they serve the read views and answer mutations with UNAVAILABLE and the leader's address.
//! When the leader goes, its lease expires (or it resigns on a planned stop) and a follower
//! wins the key, reads what it lacks of the log, and takes over.
//!
//! [`Replica`] is what the rest of the broker sees of this: the role, the term, where the
//! leader is, how far the views are. [`election`] campaigns and keeps the lease alive;
//! [`tail`] feeds the log to the writer.

pub(crate) mod election;
pub(crate) mod gate;
pub(crate) mod log;
pub(crate) mod tail;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use suanli_etcd::Etcd;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::BrokerConfig;
use crate::error::BrokerError;
use crate::writer::Handle;

/// The deadline of each etcd call.
const ETCD_DEADLINE: Duration = Duration::from_secs(1);

/// The lease behind the leader's key: a crashed leader is replaced this long after its last
/// renewal.
pub const LEASE_TTL: std::time::Duration = std::time::Duration::from_secs(5);

/// Metadata key naming the leader's address on an UNAVAILABLE answer from a follower.
pub use suanli_proto::failover::LEADER_METADATA;

/// A replica's role, as the writer last set it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoleState {
    /// This replica runs the writer and appends to the log.
    pub leader: bool,
    /// The term this replica leads, or last led or tried to lead (0: never).
    pub term: i64,
    /// Where clients reach the leader (this replica's advertised address when it leads).
    pub leader_addr: Option<String>,
}

/// What the broker knows of its place in a group. A broker without etcd is a group of one
/// that always leads.
pub struct Replica {
    /// Whether this broker is one of a group on etcd.
    replicated: bool,
    /// The gRPC address clients are sent to when this replica leads.
    advertise: String,
    role: watch::Sender<RoleState>,
    /// The next log index the views have applied.
    applied: AtomicU64,
    /// The time (unix ms) the leader applied the last entry the views have.
    applied_time: AtomicU64,
    /// The lease of the current candidacy (0: none), revoked to resign.
    lease: AtomicI64,
    /// The most recent checkpoints applied: (log index, digest), oldest first.
    checkpoints: std::sync::Mutex<std::collections::VecDeque<(u64, u64)>>,
}

/// How many checkpoints a replica remembers.
const CHECKPOINTS: usize = 16;

impl Replica {
    /// A broker on its own: it leads, always.
    pub fn standalone() -> Arc<Self> {
        Self::new(false, String::new())
    }

    /// One replica of a group, starting as a follower.
    pub fn replicated(advertise: String) -> Arc<Self> {
        Self::new(true, advertise)
    }

    fn new(replicated: bool, advertise: String) -> Arc<Self> {
        Arc::new(Replica {
            replicated,
            advertise,
            role: watch::Sender::new(RoleState {
                leader: !replicated,
                term: 0,
                leader_addr: None,
            }),
            applied: AtomicU64::new(0),
            applied_time: AtomicU64::new(0),
            lease: AtomicI64::new(0),
            checkpoints: Default::default(),
        })
    }

    /// Whether this broker is one of a group.
    pub fn is_replicated(&self) -> bool {
        self.replicated
    }

    /// This replica's advertised address.
    pub fn advertise(&self) -> &str {
        &self.advertise
    }

    /// The role now.
    pub fn role(&self) -> RoleState {
        self.role.borrow().clone()
    }

    /// Whether this replica leads now.
    pub fn is_leader(&self) -> bool {
        self.role.borrow().leader
    }

    /// Follows changes of role.
    pub fn subscribe(&self) -> watch::Receiver<RoleState> {
        self.role.subscribe()
    }

    /// The writer leads `term` from now on.
    pub(crate) fn now_leading(&self, term: i64) {
        let addr = self.advertise.clone();
        self.role.send_modify(|r| {
            r.leader = true;
            r.term = term;
            r.leader_addr = Some(addr);
        });
    }

    /// The writer no longer leads (or never took) `term`.
    pub(crate) fn now_following(&self, term: i64) {
        self.role.send_modify(|r| {
            let was_me = r.leader;
            r.leader = false;
            r.term = r.term.max(term);
            if was_me {
                r.leader_addr = None;
            }
        });
    }

    /// Another replica leads, at `addr` (`None`: no one, as far as this replica knows).
    pub(crate) fn leader_is(&self, addr: Option<String>) {
        self.role.send_if_modified(|r| {
            if r.leader || r.leader_addr == addr {
                return false;
            }
            r.leader_addr = addr;
            true
        });
    }

    /// The error a follower answers a mutation with.
    pub fn not_leader(&self) -> crate::BrokerError {
        crate::BrokerError::NotLeader {
            leader: self.role.borrow().leader_addr.clone(),
        }
    }

    /// The views have applied the log up to `next` (exclusive), the last entry written at
    /// `time` (unix ms).
    pub(crate) fn applied(&self, next: u64, time: u64) {
        self.applied.store(next, Ordering::Release);
        self.applied_time.fetch_max(time, Ordering::AcqRel);
    }

    /// The next log index the views have applied, and how old the last applied entry is at
    /// `now` (unix ms): the staleness of a follower's answers. The leader writes an entry at
    /// least every tick, so on an idle group this is at most a tick plus the lag.
    pub fn position(&self, now: u64) -> (u64, u64) {
        let time = self.applied_time.load(Ordering::Acquire);
        (
            self.applied.load(Ordering::Acquire),
            now.saturating_sub(time),
        )
    }

    /// The writer applied a checkpoint at log index `at` with `digest`.
    pub(crate) fn record_checkpoint(&self, at: u64, digest: u64) {
        let mut c = self.checkpoints.lock().expect("checkpoints");
        c.push_back((at, digest));
        if c.len() > CHECKPOINTS {
            c.pop_front();
        }
    }

    /// The most recent checkpoints applied: (log index, digest), oldest first.
    pub fn checkpoints(&self) -> Vec<(u64, u64)> {
        self.checkpoints
            .lock()
            .expect("checkpoints")
            .iter()
            .copied()
            .collect()
    }

    pub(crate) fn set_lease(&self, id: i64) {
        self.lease.store(id, Ordering::Release);
    }

    pub(crate) fn lease(&self) -> i64 {
        self.lease.load(Ordering::Acquire)
    }
}

/// A replica's connection to its group: the etcd client, the keys, the log, the role.
pub(crate) struct Group {
    etcd: Etcd,
    keys: log::Layout,
    pub(crate) store: Arc<log::EtcdStore>,
    pub(crate) replica: Arc<Replica>,
}

impl Group {
    /// Connects (lazily) to the configured etcd cluster; `listen` is the gRPC address, the
    /// advertised one unless the configuration names another.
    pub(crate) fn connect(config: &BrokerConfig, listen: SocketAddr) -> Result<Self, BrokerError> {
        let etcd = Etcd::connect(&config.etcd, ETCD_DEADLINE)
            .map_err(|e| BrokerError::Config(format!("field etcd: {e}")))?;
        let advertise = match &config.advertise {
            Some(a) if a.contains("://") || a.is_empty() => {
                return Err(BrokerError::Config(format!(
                    "field advertise: {a:?} should be host:port, without a scheme"
                )));
            }
            Some(a) => a.clone(),
            None if listen.ip().is_unspecified() => {
                return Err(BrokerError::Config(format!(
                    "field advertise: required in a group when listening on {listen}: the \
                     address clients reach this replica at"
                )));
            }
            None => listen.to_string(),
        };
        let keys = log::Layout::new(&config.etcd_prefix);
        let store = Arc::new(log::EtcdStore::new(
            etcd.clone(),
            keys.clone(),
            tokio::runtime::Handle::current(),
        ));
        info!(etcd = ?config.etcd, prefix = config.etcd_prefix, advertise, "one replica of a group");
        Ok(Group {
            etcd,
            keys,
            store,
            replica: Replica::replicated(advertise),
        })
    }

    /// Starts following the log and campaigning.
    pub(crate) fn start(&self, writer: Handle, stopping: watch::Receiver<bool>) {
        tokio::spawn(tail::follow_log(
            self.etcd.clone(),
            self.keys.clone(),
            self.replica.clone(),
            writer.clone(),
            self.store.recovered_at(),
            stopping.clone(),
        ));
        tokio::spawn(election::campaign(
            self.etcd.clone(),
            self.keys.clone(),
            self.replica.clone(),
            writer,
            stopping,
        ));
    }

    /// Hands the election over: revokes the lease, which deletes the leader key at once, so
    /// a follower takes over without waiting for the lease to run out.
    pub(crate) async fn resign(&self) {
        let lease = self.replica.lease();
        if lease == 0 {
            return;
        }
        match tokio::time::timeout(ETCD_DEADLINE, self.etcd.revoke(lease)).await {
            Ok(Ok(())) => info!("resigned from the election"),
            Ok(Err(e)) => warn!(error = %e, "could not resign; the lease runs out by itself"),
            Err(_) => warn!("etcd did not answer the resignation; the lease runs out by itself"),
        }
    }
}
