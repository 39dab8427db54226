//! The writer: the one thread that owns the engine.
//!
//! Services send it [`Op`]s over a bounded channel (full: RESOURCE_EXHAUSTED). It takes what has
//! arrived as one batch, applies each command with the same `now`, appends the batch to the log
//! with one sync, publishes the read views and only then answers the callers and tells the
//! watchers: a reply means the command is durable. It also ticks the engine, carries out leases
//! on simulated pools, tells pool agents which leases to start and stop, and marks pools whose
//! agent fell silent as lost. It keeps the ledger too, as a consequence of the log (see
//! [`crate::billing`]): it settles each lease as the engine reports its end.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustc_hash::FxHashMap;
use suanli_billing::{Bill, Ledger, Month};
use suanli_core::{
    Command, CoreError, EndReason, Engine, Event, JobCause, JobOutcome, PoolHealth, Quote,
    RequestId, RequestSpec, Runtimes,
};
use suanli_proto::v1 as pb;
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{debug, error, info, warn};

use crate::auth::{Principal, TokenRecord, Tokens, hash_secret, primary_name};
use crate::billing::{self, BillingOp};
use crate::config::{BrokerConfig, Execution};
use crate::convert;
use crate::error::BrokerError;
use crate::ha::Replica;
use crate::metrics::{self, WriterMetrics};
use crate::snapshot::{Capture, Image};
use crate::store::{Entry, IdemKey, Store};
use crate::trail::{AuditRecord, AuditTag, Trail};
use crate::views::{QueueView, Queued, Snapshot, Views};

/// Largest batch the writer takes at once.
const MAX_BATCH: usize = 4096;

/// Fleet views are republished at most this often under load (requests' own records are
/// updated with every batch).
const PUBLISH_EVERY_MS: u64 = 10;

/// Batches smaller than this come from a broker that is not under load.
const QUIET_BATCH: usize = 64;
/// After a small batch the views are republished at once, but not twice within this: at a
/// steady 10,000 calls a second batches are small and frequent, and republishing after each
/// took a third of the writer's time.
const QUICK_PUBLISH_GAP: Duration = Duration::from_millis(1);
/// Waiting requests at the head of the queue whose start is estimated (a shadow schedule) at
/// each rebuild of the queue view.
const ESTIMATED_STARTS: usize = 100;
/// A queue of 2,000 or more, and the start estimates of any queue, are rebuilt at most this
/// often.
const QUEUE_VIEW_EVERY_MS: u64 = 500;
/// Paced rebuilds of the queue view take at most 1/REBUILD_SHARE of the writer's time: a
/// rebuild reads the whole queue, and every call that arrives meanwhile waits for it, so the
/// share of calls that meet one is about the share of time rebuilds take.
const REBUILD_SHARE: u64 = 200;
/// While the engine has a pass to walk (one under way, or capacity freed, or requests queued),
/// the next tick comes after SLICE_GAP times the last one's cost, and at least a millisecond
/// later, rather than after the configured interval: requests are placed within milliseconds,
/// a tick's slice (see `suanli_core::PASS_SLICE`) places few at a time, and slices take at
/// most about a quarter of the writer's time, the calls between them the rest.
const SLICE_GAP: u32 = 3;
/// A batch that takes longer than this, from taking its operations to its last reply and
/// publication, is logged (at debug) with where its time went.
const SLOW_BATCH: Duration = Duration::from_millis(10);

/// A change to one request, for watchers.
#[derive(Clone, Debug)]
pub struct WatchEvent {
    /// The tenant that owns the request.
    pub tenant: String,
    /// The event as sent on the wire.
    pub event: pb::RequestEvent,
}

/// What services ask of the writer.
pub(crate) enum Op {
    Apply {
        command: Command,
        key: Option<IdemKey>,
        reply: oneshot::Sender<Result<Vec<Event>, BrokerError>>,
    },
    /// A submission; refused unless some registered pool could ever hold it, or it waits for
    /// pools that may register later.
    Submit {
        spec: RequestSpec,
        wait_for_pools: bool,
        key: Option<IdemKey>,
        reply: oneshot::Sender<Result<Vec<Event>, BrokerError>>,
    },
    Grant {
        principal: Principal,
        token: String,
        reply: oneshot::Sender<Result<(), BrokerError>>,
    },
    /// A token an operator creates; its name must be free and its owner known.
    CreateToken {
        record: TokenRecord,
        key: Option<IdemKey>,
        reply: oneshot::Sender<Result<(), BrokerError>>,
    },
    RevokeToken {
        name: String,
        key: Option<IdemKey>,
        reply: oneshot::Sender<Result<(), BrokerError>>,
    },
    Quote {
        spec: RequestSpec,
        reply: oneshot::Sender<Result<(Quote, Option<Bill>), BrokerError>>,
    },
    /// An accounting command, logged like a command of the engine; answered with when it
    /// was applied (for a retry, when it was applied the first time).
    Billing {
        op: BillingOp,
        key: Option<IdemKey>,
        reply: oneshot::Sender<Result<u64, BrokerError>>,
    },
    /// Reads the ledger once the batch it arrived in is durable.
    ReadLedger(Box<dyn FnOnce(&Ledger) + Send>),
    AgentHello {
        pool: String,
        running: Vec<u64>,
        runtimes: Runtimes,
        tx: mpsc::Sender<pb::BrokerMessage>,
    },
    Heartbeat {
        pool: String,
    },
    /// The server has stopped: finish this batch and end, even if calls still hold handles.
    Stop,
    /// Log entries the leader appended, from log index `first` on: a follower applies those
    /// it lacks (see [`crate::ha`]).
    Replicated {
        first: u64,
        entries: Vec<Entry>,
    },
    /// This replica won the election for `term`: catch up with the log and lead.
    Promote {
        term: i64,
    },
    /// The lease behind `term` is lost: stop leading.
    Demote {
        term: i64,
    },
    /// The log's tail lost its place (the log was compacted past it): start again from the
    /// latest snapshot.
    Resync,
    /// Appends a checkpoint; answers its log index and the digest there.
    Checkpoint {
        reply: oneshot::Sender<Result<(u64, u64), BrokerError>>,
    },
    /// An operator's operation: the first entry it logs carries `tag`.
    Audited {
        tag: Arc<AuditTag>,
        op: Box<Op>,
    },
    /// An operator's call was refused: logged for the trail.
    Refused {
        tag: AuditTag,
        reason: String,
    },
}

/// How long a request_id is remembered: the API promises 24 hours...
pub const IDEMPOTENCY_WINDOW_MS: u64 = 24 * 3600 * 1000;

/// ...or the last million, if more came in those hours. Each key costs about 500 bytes (the
/// key twice, the first result), so without a count a day of sustained load (a thousand calls
/// a second is 86 million keys) would take the broker's memory; a million covers 24 hours
/// up to 11 calls a second, and at 10,000 a second still the last 100 s of retries.
pub const IDEMPOTENCY_MAX_KEYS: usize = 1_000_000;

/// A caller and its request_id as the table of first results keeps them: the first 16 bytes
/// of the SHA-256 of both. A million keys take a sixth of the memory the two strings did
/// (twice, in the table and in the order of arrival); two distinct pairs share a slot with
/// probability 2^-128.
type Slot = u128;

fn slot(caller: &str, request_id: &str) -> Slot {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    // The caller's length first, so that ("ab", "c") and ("a", "bc") differ.
    ctx.update(&(caller.len() as u64).to_le_bytes());
    ctx.update(caller.as_bytes());
    ctx.update(request_id.as_bytes());
    let digest = ctx.finish();
    let mut first = [0; 16];
    first.copy_from_slice(&digest.as_ref()[..16]);
    u128::from_le_bytes(first)
}

/// The first result of every request_id seen in the last [`IDEMPOTENCY_WINDOW_MS`], by
/// caller and request_id, with what the call asked ([`IdemKey::asked`]).
#[derive(Clone, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct Idempotency {
    results: FxHashMap<Slot, (u64, Vec<Event>)>,
    /// Keys in the order they were first seen, with that time, for expiry.
    seen: std::collections::VecDeque<(u64, Slot)>,
}

impl Idempotency {
    /// The first result under the key's caller and request_id, if any; an error when that
    /// request_id was used for another call.
    fn get(&self, key: &IdemKey) -> Result<Option<&Vec<Event>>, BrokerError> {
        match self.results.get(&slot(&key.caller, &key.request_id)) {
            None => Ok(None),
            // 0: recorded before keys said what the call asked.
            Some((asked, events)) if *asked == key.asked || *asked == 0 => Ok(Some(events)),
            Some(_) => Err(BrokerError::field(
                "request_id",
                format!(
                    "{:?} was used in the last 24 hours for a different call; a retry must \
                     repeat its call exactly, and a new call needs a new request_id",
                    key.request_id
                ),
            )),
        }
    }

    /// When the call under the key was first applied: its place in the order keys were seen.
    /// Only a retry asks, so a walk from the newest is cheap enough, and no format changes.
    fn first_at(&self, key: &IdemKey) -> Option<u64> {
        let wanted = slot(&key.caller, &key.request_id);
        self.seen
            .iter()
            .rev()
            .find(|(_, s)| *s == wanted)
            .map(|(at, _)| *at)
    }

    /// Remembers a first result and forgets keys older than the window, and the oldest
    /// beyond [`IDEMPOTENCY_MAX_KEYS`].
    fn insert(&mut self, key: IdemKey, events: Vec<Event>, now: u64) {
        self.insert_keeping(key, events, now, IDEMPOTENCY_MAX_KEYS);
    }

    /// [`Idempotency::insert`], keeping at most `max_keys`.
    fn insert_keeping(&mut self, key: IdemKey, events: Vec<Event>, now: u64, max_keys: usize) {
        while let Some((at, _)) = self.seen.front() {
            if at + IDEMPOTENCY_WINDOW_MS > now && self.seen.len() < max_keys {
                break;
            }
            let (_, old) = self.seen.pop_front().expect("front exists");
            self.results.remove(&old);
        }
        let s = slot(&key.caller, &key.request_id);
        self.seen.push_back((now, s));
        self.results.insert(s, (key.asked, events));
    }
}

/// [`Idempotency`] as snapshots of formats 6 to 8 hold it, by caller and request_id in full.
#[derive(Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct IdempotencyByName {
    results: FxHashMap<(String, String), (u64, Vec<Event>)>,
    seen: std::collections::VecDeque<(u64, (String, String))>,
}

impl From<IdempotencyByName> for Idempotency {
    fn from(old: IdempotencyByName) -> Idempotency {
        Idempotency {
            results: old
                .results
                .into_iter()
                .map(|((caller, id), result)| (slot(&caller, &id), result))
                .collect(),
            seen: old
                .seen
                .into_iter()
                .map(|(at, (caller, id))| (at, slot(&caller, &id)))
                .collect(),
        }
    }
}

/// [`Idempotency`] as snapshots of format 6 hold it, before keys recorded what the call
/// asked.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct IdempotencyBeforeAsked {
    results: FxHashMap<crate::store::KeyBeforeAsked, Vec<Event>>,
    seen: std::collections::VecDeque<(u64, crate::store::KeyBeforeAsked)>,
}

impl From<IdempotencyBeforeAsked> for Idempotency {
    fn from(old: IdempotencyBeforeAsked) -> Idempotency {
        let slot = |k: &crate::store::KeyBeforeAsked| slot(&k.caller, &k.request_id);
        Idempotency {
            results: old
                .results
                .into_iter()
                .map(|(k, events)| (slot(&k), (0, events)))
                .collect(),
            seen: old.seen.into_iter().map(|(at, k)| (at, slot(&k))).collect(),
        }
    }
}

/// The services' end of the writer's channel.
#[derive(Clone)]
pub(crate) struct Handle {
    tx: SyncSender<Op>,
    /// The audit tag of an operator's call, sent with each of its operations.
    audit: Option<Arc<AuditTag>>,
}

impl Handle {
    /// This handle, sending `tag` with each operation: the first entry an operation logs
    /// carries it (see [`crate::trail`]).
    pub fn audited(&self, tag: AuditTag) -> Handle {
        Handle {
            tx: self.tx.clone(),
            audit: Some(Arc::new(tag)),
        }
    }

    /// Logs that an operator's call was refused, and why. Not answered: a refusal that cannot
    /// be logged (the queue is full, this replica does not lead) is only a warning.
    pub fn refused(&self, tag: AuditTag, reason: String) {
        if let Err(e) = self.tx.try_send(Op::Refused { tag, reason }) {
            warn!(error = %e, "a refused operator call could not be put in the audit trail");
        }
    }

    fn send(&self, op: Op) -> Result<(), BrokerError> {
        let op = match &self.audit {
            Some(tag) => Op::Audited {
                tag: tag.clone(),
                op: Box::new(op),
            },
            None => op,
        };
        self.tx.try_send(op).map_err(|e| match e {
            TrySendError::Full(_) => BrokerError::Overloaded("the command queue is full"),
            TrySendError::Disconnected(_) => {
                BrokerError::Unavailable("the writer has stopped".into())
            }
        })
    }

    /// Asks the writer to end after the operations already sent; waits for room in the
    /// queue if it is full. Blocking: call it off the async runtime.
    pub fn stop(&self) {
        let _ = self.tx.send(Op::Stop);
    }

    /// Sends what replication tells the writer; waits (off the runtime's threads) for room
    /// rather than failing: none of it may be lost. False once the writer has stopped.
    pub async fn deliver(&self, op: Op) -> bool {
        match self.tx.try_send(op) {
            Ok(()) => true,
            Err(TrySendError::Disconnected(_)) => false,
            Err(TrySendError::Full(op)) => {
                let tx = self.tx.clone();
                tokio::task::spawn_blocking(move || tx.send(op).is_ok())
                    .await
                    .unwrap_or(false)
            }
        }
    }

    async fn ask<T>(&self, op: impl FnOnce(oneshot::Sender<T>) -> Op) -> Result<T, BrokerError> {
        let (reply, rx) = oneshot::channel();
        self.send(op(reply))?;
        rx.await
            .map_err(|_| BrokerError::Unavailable("the writer has stopped".into()))
    }

    /// Queues a command now, in the order of the calls, and returns what answers once it is
    /// durable: a caller can queue its next command before this one is answered.
    pub fn enqueue(
        &self,
        command: Command,
        key: Option<IdemKey>,
    ) -> Result<impl Future<Output = Result<Vec<Event>, BrokerError>> + use<>, BrokerError> {
        let (reply, rx) = oneshot::channel();
        self.send(Op::Apply {
            command,
            key,
            reply,
        })?;
        Ok(async move {
            rx.await
                .map_err(|_| BrokerError::Unavailable("the writer has stopped".into()))?
        })
    }

    /// Applies a command; answers once it is durable. A rejection is an error.
    pub async fn apply(
        &self,
        command: Command,
        key: Option<IdemKey>,
    ) -> Result<Vec<Event>, BrokerError> {
        self.ask(|reply| Op::Apply {
            command,
            key,
            reply,
        })
        .await?
    }

    /// Submits a request; answers once it is durable. Unless `wait_for_pools`, a request no
    /// registered pool could ever hold is refused.
    pub async fn submit(
        &self,
        spec: RequestSpec,
        wait_for_pools: bool,
        key: Option<IdemKey>,
    ) -> Result<Vec<Event>, BrokerError> {
        self.ask(|reply| Op::Submit {
            spec,
            wait_for_pools,
            key,
            reply,
        })
        .await?
    }

    /// Grants a token durably.
    pub async fn grant(&self, principal: Principal, token: String) -> Result<(), BrokerError> {
        self.ask(|reply| Op::Grant {
            principal,
            token,
            reply,
        })
        .await?
    }

    /// Creates a token (its `created_ms` is set to when it is applied); answers once it is
    /// durable.
    pub async fn create_token(
        &self,
        record: TokenRecord,
        key: Option<IdemKey>,
    ) -> Result<(), BrokerError> {
        self.ask(|reply| Op::CreateToken { record, key, reply })
            .await?
    }

    /// Revokes a token; answers once it is durable.
    pub async fn revoke_token(
        &self,
        name: String,
        key: Option<IdemKey>,
    ) -> Result<(), BrokerError> {
        self.ask(|reply| Op::RevokeToken { name, key, reply })
            .await?
    }

    /// A dry run of a submission, with what it would cost after subsidy when placeable now.
    pub async fn quote(&self, spec: RequestSpec) -> Result<(Quote, Option<Bill>), BrokerError> {
        self.ask(|reply| Op::Quote { spec, reply }).await?
    }

    /// Applies an accounting command; answers once it is durable.
    /// Applies an accounting command; answers when it was applied (for a retry of a
    /// request_id, when it was applied the first time), from which the caller's answer is
    /// made: the same for every retry, never a new read.
    pub async fn billing(&self, op: BillingOp, key: Option<IdemKey>) -> Result<u64, BrokerError> {
        self.ask(|reply| Op::Billing { op, key, reply }).await?
    }

    /// Reads the ledger, as of the end of a durable batch.
    pub async fn read_ledger<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Ledger) -> T + Send + 'static,
    ) -> Result<T, BrokerError> {
        self.ask(|reply| {
            Op::ReadLedger(Box::new(move |ledger| {
                let _ = reply.send(read(ledger));
            }))
        })
        .await
    }

    /// Appends a checkpoint (see [`Entry::Checkpoint`]); answers its log index and the
    /// digest there once it is durable.
    pub async fn checkpoint(&self) -> Result<(u64, u64), BrokerError> {
        self.ask(|reply| Op::Checkpoint { reply }).await?
    }

    /// An agent joined (or came back).
    pub fn agent_hello(
        &self,
        pool: String,
        running: Vec<u64>,
        runtimes: Runtimes,
        tx: mpsc::Sender<pb::BrokerMessage>,
    ) -> Result<(), BrokerError> {
        self.send(Op::AgentHello {
            pool,
            running,
            runtimes,
            tx,
        })
    }

    /// An agent is alive.
    pub fn heartbeat(&self, pool: String) -> Result<(), BrokerError> {
        self.send(Op::Heartbeat { pool })
    }
}

struct AgentLink {
    tx: mpsc::Sender<pb::BrokerMessage>,
    last_heartbeat: u64,
}

enum Reply {
    Events(
        oneshot::Sender<Result<Vec<Event>, BrokerError>>,
        Result<Vec<Event>, BrokerError>,
    ),
    Unit(oneshot::Sender<Result<(), BrokerError>>),
    /// When an accounting command was applied.
    At(oneshot::Sender<Result<u64, BrokerError>>, u64),
    /// A read of the ledger, answered once the batch is durable, so that nobody reads a
    /// settlement a crash could still take back.
    Read(Box<dyn FnOnce(&Ledger) + Send>),
    /// A checkpoint's log index and digest.
    Checkpoint(oneshot::Sender<Result<(u64, u64), BrokerError>>, (u64, u64)),
}

/// The writer's state. See the module documentation.
pub(crate) struct Writer {
    engine: Engine,
    store: Arc<dyn Store>,
    /// The log index of the latest snapshot, and the thread saving one, if any.
    last_snapshot: u64,
    /// The size of the last snapshot, for the next one's buffer.
    snapshot_size: Arc<std::sync::atomic::AtomicUsize>,
    snapshotting: Option<std::thread::JoinHandle<Result<(), BrokerError>>>,
    views: Arc<Views>,
    tokens: Tokens,
    /// The audit trail: what applying the log gives (see [`crate::trail`]).
    trail: Trail,
    config: Arc<BrokerConfig>,
    idem: Idempotency,
    watch: broadcast::Sender<Arc<WatchEvent>>,
    pending_watch: Vec<Arc<WatchEvent>>,
    /// Commands that follow from events (a simulated lease starting), applied in the same batch.
    followups: Vec<Command>,
    /// (due, request) of simulated leases to finish.
    timers: BinaryHeap<Reverse<(u64, u64)>>,
    agents: HashMap<String, AgentLink>,
    /// (ended at, request) of ended requests still readable, oldest first.
    ended: VecDeque<(u64, u64)>,
    /// The spec of the submission being applied, for its new record.
    submitting: Option<RequestSpec>,
    /// The job outcome of the lease report being applied, for the record it ends.
    finishing: Option<JobOutcome>,
    started_at: u64,
    last_publish: u64,
    /// When the views were last published, precisely.
    last_publish_at: Instant,
    publish_due: bool,
    /// A small batch is waiting to be published: within [`QUICK_PUBLISH_GAP`].
    quick_publish: bool,
    /// When a long queue's view may be rebuilt next.
    next_queue_publish: u64,
    now: u64,
    live: bool,
    /// Op::Stop came: end after this batch.
    stopping: bool,
    /// Counters and timings for `/metrics`.
    metrics: Arc<WriterMetrics>,
    /// The accounting ledger, derived from the log (see [`crate::billing`]).
    ledger: Ledger,
    /// What the engine was last told of tenants' vouchers, and when to tell it again.
    subsidies: billing::Subsidies,
    /// When to look for closed months to fold in the ledger next: the start of next month.
    close_months_at: u64,
    /// This broker's place in its group (see [`crate::ha`]).
    replica: Arc<Replica>,
    /// The next log index this writer has applied.
    applied: u64,
    /// The term this writer leads (0: none, or a broker on its own).
    term: i64,
    /// The lease of the term is lost, or another replica appended: stop leading.
    deposed: bool,
    /// Why the command log cannot be written, while it cannot (a broker on its own): calls
    /// that would log are refused with it, reads go on, and the log is tried again every
    /// [`LOG_PROBE_MS`].
    log_fault: Option<LogFault>,
    /// When to try the unwritable log again.
    next_probe: u64,
}

/// What the command log said when it could not be written.
#[derive(Clone, Debug)]
struct LogFault {
    reason: String,
    full: bool,
}

impl LogFault {
    fn of(e: &BrokerError) -> Self {
        match e {
            BrokerError::LogUnwritable { reason, full } => LogFault {
                reason: reason.clone(),
                full: *full,
            },
            e => LogFault {
                reason: e.to_string(),
                full: false,
            },
        }
    }

    fn error(&self) -> BrokerError {
        BrokerError::LogUnwritable {
            reason: self.reason.clone(),
            full: self.full,
        }
    }
}

/// How often an unwritable command log is tried again (ms).
const LOG_PROBE_MS: u64 = 1_000;

/// What a replica does next after following.
enum Next {
    Stop,
    Lead(i64),
    Resync,
}

/// How a term of leading ended.
enum Exit {
    Stopped,
    Deposed,
}

/// Wall-clock unix milliseconds.
pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Writer {
    /// Loads the latest snapshot, replays the log after it, and rebuilds the views, tokens and
    /// idempotency keys.
    pub fn recover(
        config: Arc<BrokerConfig>,
        store: Arc<dyn Store>,
        views: Arc<Views>,
        tokens: Tokens,
        watch: broadcast::Sender<Arc<WatchEvent>>,
        replica: Arc<Replica>,
    ) -> Result<Self, BrokerError> {
        Self::recover_counting(config, store, views, tokens, watch, replica, Arc::default())
    }

    /// [`Writer::recover`], counting into `metrics`.
    fn recover_counting(
        config: Arc<BrokerConfig>,
        store: Arc<dyn Store>,
        views: Arc<Views>,
        tokens: Tokens,
        watch: broadcast::Sender<Arc<WatchEvent>>,
        replica: Arc<Replica>,
        metrics: Arc<WriterMetrics>,
    ) -> Result<Self, BrokerError> {
        let engine = Engine::new(config.engine.clone(), suanli_core::Catalogue::builtin());
        let mut w = Writer {
            engine,
            store,
            last_snapshot: 0,
            snapshot_size: Arc::default(),
            snapshotting: None,
            views,
            tokens,
            trail: Trail::default(),
            config,
            idem: Idempotency::default(),
            watch,
            pending_watch: Vec::new(),
            followups: Vec::new(),
            timers: BinaryHeap::new(),
            agents: HashMap::new(),
            ended: VecDeque::new(),
            submitting: None,
            finishing: None,
            started_at: 0,
            last_publish: 0,
            last_publish_at: Instant::now(),
            publish_due: false,
            quick_publish: false,
            next_queue_publish: 0,
            now: 0,
            live: false,
            stopping: false,
            metrics,
            ledger: Ledger::new(),
            subsidies: billing::Subsidies::default(),
            close_months_at: 0,
            replica,
            applied: 0,
            term: 0,
            deposed: false,
            log_fault: None,
            next_probe: 0,
        };
        let recovered = w.store.recover()?;
        if let Some((at, bytes)) = recovered.snapshot {
            w.install(at, Image::decode(at, &bytes)?)?;
        }
        let count = recovered.entries.len();
        w.applied = w.last_snapshot;
        for entry in recovered.entries {
            w.apply_replicated(entry);
        }
        w.followups.clear();
        w.pending_watch.clear();
        w.applied = w.store.next_index();
        w.replica.applied(w.applied, w.now);
        let now = w.clock();
        w.forget_ended(now);
        info!(
            snapshot_at = w.last_snapshot,
            entries = count,
            digest = w.engine.digest(),
            "recovered the snapshot and the command log after it"
        );
        Ok(w)
    }

    /// Applies a logged entry as the writer that logged it did.
    fn replay(&mut self, entry: Entry) {
        match entry {
            Entry::Command { now, command, key } => {
                self.now = self.now.max(now);
                self.before_command(now);
                self.note(&command);
                let events = self.engine.apply(command, now);
                self.process(&events, now);
                if let Some(k) = key {
                    self.idem.insert(k, events, now);
                }
            }
            Entry::Billing { now, op, key } => {
                self.now = self.now.max(now);
                if let Err(e) = self.apply_billing(op, now) {
                    warn!(error = %e, "a logged accounting command failed on replay");
                }
                if let Some(k) = key {
                    self.idem.insert(k, Vec::new(), now);
                }
            }
            Entry::Credential { principal, token } => {
                let record = self.primary_token(principal, &token, self.now);
                self.tokens.issue(record);
            }
            Entry::TokenIssued { record, key } => {
                self.now = self.now.max(record.created_ms);
                let now = record.created_ms;
                self.tokens.issue(record);
                if let Some(k) = key {
                    self.idem.insert(k, Vec::new(), now);
                }
            }
            Entry::TokenRevoked { name, at, key } => {
                self.now = self.now.max(at);
                self.tokens.revoke(&name, at);
                if let Some(k) = key {
                    self.idem.insert(k, Vec::new(), at);
                }
            }
            Entry::Audited { at, tag, entry } => {
                self.trail.push(AuditRecord {
                    at,
                    tag,
                    refused: String::new(),
                });
                self.replay(*entry);
            }
            Entry::Synced { now } => {
                self.now = self.now.max(now);
                self.before_command(now);
            }
            Entry::Refused(record) => {
                self.now = self.now.max(record.at);
                self.trail.push(record);
            }
            Entry::Checkpoint => {}
        }
    }

    /// Applies the entry at index `self.applied` (from recovery, or another replica's
    /// append), recording the digest at a checkpoint.
    fn apply_replicated(&mut self, entry: Entry) {
        if matches!(entry, Entry::Checkpoint) {
            self.replica
                .record_checkpoint(self.applied, self.engine.digest());
        }
        self.replay(entry);
        self.applied += 1;
    }

    /// Throws the state away and recovers it from the store: after a term ends (its last
    /// batch may not be in the log), when the log's tail lost its place, or when the log
    /// could not take a batch.
    fn rebuild(&mut self) -> Result<(), BrokerError> {
        if let Some(h) = self.snapshotting.take() {
            Self::finished(h);
        }
        // The state is read back into views of its own, which the shared views then take
        // over: readers see the old state until then, not an empty one. The tokens are read
        // back into a table of their own too and taken over in one step, so a caller is never
        // refused in the meantime, and a revocation or a grant that never reached the log is
        // undone. The lease gauges count again as the records come back.
        self.metrics.forget_leases();
        let views = Arc::new(Views::default());
        let fresh = Writer::recover_counting(
            self.config.clone(),
            self.store.clone(),
            views.clone(),
            Tokens::default(),
            self.watch.clone(),
            self.replica.clone(),
            self.metrics.clone(),
        );
        let mut fresh = match fresh {
            Ok(fresh) => fresh,
            Err(e) => {
                // The old state stays readable: count its leases again.
                self.metrics.forget_leases();
                for r in self.views.requests.iter() {
                    self.metrics.moved(None, r.value().state);
                }
                return Err(e);
            }
        };
        self.views.take_over(&views);
        fresh.views = self.views.clone();
        self.tokens.assign(&fresh.tokens);
        fresh.tokens = self.tokens.clone();
        self.trail.assign(&fresh.trail);
        fresh.trail = self.trail.clone();
        *self = fresh;
        let now = self.now;
        self.publish(now, true);
        Ok(())
    }

    /// [`Writer::rebuild`] until it works: etcd may be electing a leader of its own.
    fn rebuild_until_done(&mut self) {
        let mut wait = Duration::from_millis(100);
        while let Err(e) = self.rebuild() {
            error!(error = %e, "could not read the state back from the store; again");
            std::thread::sleep(wait);
            wait = (wait * 2).min(Duration::from_secs(2));
        }
    }

    /// Catches up with the log and takes over as leader of `term`: the start-up commands
    /// (missing pools, changed tenants, missing tokens) are this term's first batch.
    fn promote(&mut self, term: i64) -> Result<(), BrokerError> {
        let entries = match self.store.read_from(self.applied)? {
            Some(entries) => entries,
            None => {
                // The log before a snapshot this replica lacks is gone: start from it.
                self.rebuild()?;
                self.store.read_from(self.applied)?.ok_or_else(|| {
                    BrokerError::Store("the log moved on during the takeover".into())
                })?
            }
        };
        let caught_up = entries.len();
        for entry in entries {
            self.apply_replicated(entry);
        }
        self.followups.clear();
        self.pending_watch.clear();
        self.store.lead(term, self.applied);
        self.term = term;
        self.deposed = false;
        let (commands, grants) =
            crate::server::start_up(&self.config, &self.engine, &self.tokens, None);
        let granted = self.bootstrap(commands, grants.clone())?;
        crate::server::save_credentials(&self.config, &self.tokens, &granted)?;
        self.applied = self.store.next_index();
        self.replica.applied(self.applied, self.now);
        self.replica.now_leading(term);
        info!(
            term,
            index = self.applied,
            caught_up,
            digest = self.engine.digest(),
            "leading"
        );
        Ok(())
    }

    /// Ends (or gives up taking) `term`: the store appends no more, the role is follower.
    fn step_down(&mut self, term: i64) {
        self.store.resign();
        self.replica.now_following(term);
    }

    /// Answers an operation a follower does not take with the leader's address.
    fn refuse(&self, op: Op) {
        // A refused operator call is not logged by a follower, and the service refused an
        // agent's stream already (the link closes with the sender); the rest steer the
        // writer, which `follow` handles itself.
        if let Some(Op::ReadLedger(read)) = answer_with(op, || self.replica.not_leader()) {
            read(&self.ledger);
        }
    }

    /// Applies what the leader appended, as a follower: the views follow the log.
    fn follow(&mut self, rx: &Receiver<Op>) -> Next {
        self.live = false;
        self.agents.clear();
        self.timers.clear();
        let now = self.now;
        self.publish(now, true);
        let mut ops = Vec::new();
        loop {
            let wait = if self.publish_due {
                Duration::from_millis(PUBLISH_EVERY_MS)
            } else {
                Duration::from_secs(1)
            };
            match rx.recv_timeout(wait) {
                Ok(op) => ops.push(op),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Next::Stop,
            }
            while ops.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(op) => ops.push(op),
                    Err(_) => break,
                }
            }
            let mut next = None;
            for op in ops.drain(..) {
                match op {
                    Op::Replicated { first, entries } => {
                        if next.is_some() {
                            continue;
                        }
                        if first > self.applied {
                            warn!(
                                applied = self.applied,
                                first, "the log's tail skipped entries; reading the state again"
                            );
                            next = Some(Next::Resync);
                            continue;
                        }
                        let skip = (self.applied - first) as usize;
                        for entry in entries.into_iter().skip(skip) {
                            self.apply_replicated(entry);
                        }
                        self.followups.clear();
                        self.pending_watch.clear();
                        self.publish_due = true;
                    }
                    Op::Promote { term } => next = Some(Next::Lead(term)),
                    Op::Resync => next = Some(Next::Resync),
                    Op::Stop => return Next::Stop,
                    other => self.refuse(other),
                }
            }
            self.replica.applied(self.applied, self.now);
            let now = self.now;
            if self.publish_due
                && (next.is_some() || wall_ms() >= self.last_publish + PUBLISH_EVERY_MS)
            {
                self.forget_ended(now);
                self.publish(now, false);
                self.last_publish = wall_ms();
            }
            if let Some(next) = next {
                return next;
            }
        }
    }

    /// Takes a snapshot's state as the writer's own.
    fn install(&mut self, at: u64, image: Image) -> Result<(), BrokerError> {
        let requests = image.requests()?;
        let Image {
            engine,
            ended,
            idempotency,
            tokens,
            now,
            ledger,
            trail,
            ..
        } = image;
        engine
            .audit()
            .map_err(|e| BrokerError::Store(format!("snapshot at log index {at}: {e}")))?;
        self.engine = engine;
        let mut jobs: Vec<(u64, u64)> = requests
            .iter()
            .filter(|r| r.outcome.is_some())
            .map(|r| (r.update_time_unix_ms, r.id))
            .collect();
        jobs.sort_unstable();
        for (_, id) in jobs.iter().rev().take(crate::views::RECENT_JOBS).rev() {
            self.views.job_ended(*id);
        }
        for r in requests {
            self.metrics.moved(None, r.state);
            self.views
                .by_tenant
                .entry(r.tenant.clone())
                .or_default()
                .push(r.id);
            self.views.requests.insert(r.id, Arc::new(r));
        }
        self.ended = ended;
        self.idem = idempotency;
        self.ledger = ledger;
        // The engine came with its subsidies; check them again before the next command.
        self.subsidies = billing::Subsidies::default();
        self.close_months_at = 0;
        for record in tokens {
            self.tokens.issue(record);
        }
        for record in trail {
            self.trail.push(record);
        }
        self.now = now;
        self.last_snapshot = at;
        Ok(())
    }

    /// Starts saving a snapshot when enough of the log has grown since the last one and no
    /// snapshot is being saved.
    fn maybe_snapshot(&mut self) {
        let upto = self.store.next_index();
        if upto < self.last_snapshot + self.config.snapshot_every {
            return;
        }
        if let Some(h) = self.snapshotting.take_if(|h| h.is_finished()) {
            Self::finished(h);
        }
        if self.snapshotting.is_some() {
            return;
        }
        let idempotency = match postcard::to_allocvec(&self.idem) {
            Ok(bytes) => bytes,
            Err(e) => {
                warn!(error = %e, "could not encode the idempotency keys; no snapshot this time");
                self.last_snapshot = upto;
                return;
            }
        };
        let capture = Capture {
            upto,
            engine: self.engine.clone(),
            records: self
                .views
                .requests
                .iter()
                .map(|r| r.value().clone())
                .collect(),
            ended: self.ended.clone(),
            idempotency,
            tokens: self.tokens.records().into_iter().map(|(r, _)| r).collect(),
            trail: self.trail.records(),
            now: self.now,
            ledger: self.ledger.image(),
            last_size: self.snapshot_size.clone(),
        };
        self.last_snapshot = upto;
        self.snapshotting = Some(capture.save_in_background(self.store.clone()));
    }

    /// Logs how a snapshot thread ended: a failed snapshot loses nothing (the log is kept).
    fn finished(h: std::thread::JoinHandle<Result<(), BrokerError>>) {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "snapshot failed; the log is kept whole"),
            Err(_) => warn!("the snapshot thread panicked; the log is kept whole"),
        }
    }

    /// What the writer counts and times, for `/metrics`.
    pub fn metrics(&self) -> Arc<WriterMetrics> {
        self.metrics.clone()
    }

    /// The audit trail this writer keeps.
    pub fn trail(&self) -> Trail {
        self.trail.clone()
    }

    /// The engine (for start-up checks).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The ledger.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Applies an accounting command to the ledger; the same on live apply and on replay.
    fn apply_billing(&mut self, op: BillingOp, now: u64) -> Result<(), BrokerError> {
        let tenant = match &op {
            BillingOp::IssueVoucher(v) => Some(&v.tenant),
            BillingOp::SetBudget { tenant, .. } | BillingOp::Adjust { tenant, .. } => Some(tenant),
            BillingOp::SetSubsidyBudget { .. } => None,
        };
        if let Some(tenant) = tenant
            && self.engine.tenant_usage(tenant).is_none()
        {
            return Err(BrokerError::NotFound(format!("tenant {tenant} not found")));
        }
        match op {
            BillingOp::IssueVoucher(v) => {
                self.subsidies.changed(&v.tenant);
                self.ledger.issue_voucher(v, now)
            }
            BillingOp::SetBudget { tenant, budget } => {
                if let Some(b) = &budget {
                    b.validate().map_err(billing::billing_error)?;
                }
                self.ledger.set_budget(&tenant, budget, now)
            }
            BillingOp::SetSubsidyBudget { monthly } => self.ledger.set_subsidy_budget(monthly, now),
            BillingOp::Adjust {
                tenant,
                amount,
                reason,
            } => self.ledger.adjust(&tenant, amount, &reason, now),
        }
        .map_err(billing::billing_error)
    }

    /// What the writer derives from the ledger before each command at `now`, live and on
    /// replay alike, from the ledger and `now` alone, so replay arrives at the same state.
    /// True when the engine changed: a caller whose command is then not logged (refused, or
    /// a quote) logs [`Entry::Synced`] instead, so that replay changes it the same way.
    fn before_command(&mut self, now: u64) -> bool {
        self.close_months(now);
        self.sync_subsidies(now)
    }

    /// At the first command of a month, folds the ledger's months before last month into its
    /// checkpoint (see `suanli_billing::ledger`): their statements stay whole, their per-lease
    /// detail leaves memory (it stays in the command log), so the ledger does not grow
    /// without bound. Last month stays open. Whether anything is folded depends only on the
    /// ledger and `now`: on whether an entry not yet folded is older than last month.
    fn close_months(&mut self, now: u64) {
        if now < self.close_months_at {
            return;
        }
        let month = Month::containing(now);
        self.close_months_at = u64::try_from(month.next().starts_at_ms()).unwrap_or(u64::MAX);
        let Some(before) = billing::months_to_close(&self.ledger, month) else {
            return;
        };
        match self.ledger.compact(before, now) {
            Ok(outcome) if outcome.compacted => info!(
                closed_before = %before,
                leases = outcome.leases_folded,
                entries = outcome.entries_replaced,
                "folded closed months of the ledger into its checkpoint"
            ),
            Ok(_) => {}
            Err(e) => error!(error = %e, "could not fold closed months of the ledger"),
        }
    }

    /// Tells the engine which vouchers can pay each tenant's bills at `now` when that may
    /// have changed, so placement under "cheapest after subsidy" decides the same live and on
    /// replay (see [`billing::Subsidies`]).
    fn sync_subsidies(&mut self, now: u64) -> bool {
        let commands = self.subsidies.sync(&self.ledger, &self.engine, now);
        let changed = !commands.is_empty();
        for command in commands {
            let events = self.engine.apply(command, now);
            if let [Event::Rejected { error }] = &events[..] {
                error!(error = %error, "the engine refused a tenant's subsidies");
            }
        }
        changed
    }

    /// Whether a tenant has a budget: only then are its submissions checked and its placed
    /// leases held.
    fn has_budget(&self, tenant: &str) -> bool {
        self.ledger
            .tenant(tenant)
            .is_some_and(|a| a.budget.is_some())
    }

    /// Refuses a submission that would take its tenant past its budget: what it would pay
    /// after subsidy for the placement the engine would choose now, for its whole duration
    /// (nothing when it would wait), on top of what it has paid in the budget's period.
    fn check_budget(&mut self, spec: &RequestSpec, now: u64) -> Result<(), BrokerError> {
        if !self.has_budget(&spec.tenant) {
            return Ok(());
        }
        let estimate = match self.engine.quote(spec, now)?.placement {
            Some(p) => {
                let usage = billing::quoted_usage(&self.engine, spec, &p, now);
                self.ledger
                    .quote(&usage)
                    .map_err(billing::billing_error)?
                    .tenant_due
            }
            None => suanli_billing::Fen::ZERO,
        };
        self.ledger
            .would_exceed(&spec.tenant, estimate, now)
            .map_err(billing::billing_error)
    }

    /// A quote with what it would cost after subsidy.
    fn quote(
        &mut self,
        spec: &RequestSpec,
        now: u64,
    ) -> Result<(Quote, Option<Bill>), BrokerError> {
        let quote = self.engine.quote(spec, now)?;
        let bill = match &quote.placement {
            Some(p) => {
                let usage = billing::quoted_usage(&self.engine, spec, p, now);
                Some(self.ledger.quote(&usage).map_err(billing::billing_error)?)
            }
            None => None,
        };
        Ok((quote, bill))
    }

    /// Settles a lease that ended at `now`, from the record it had before; a lease that never
    /// ran is not charged, and only its budget hold (if any) is released.
    fn settle(&mut self, previous: Option<&pb::Request>, now: u64) {
        let Some(previous) = previous.filter(|p| p.lease.is_some()) else {
            return;
        };
        let Some(usage) = billing::usage_of(&self.engine, previous, now) else {
            let lease = billing::lease_id(previous.id, previous.leases.max(1));
            if self.ledger.hold(&lease).is_some()
                && let Err(e) = self.ledger.release_hold(lease.clone(), now)
            {
                error!(lease = %lease, error = %e, "could not release a budget hold");
            }
            return;
        };
        let lease = usage.lease.clone();
        match self.ledger.settle(usage, now) {
            Ok(outcome) if !outcome.settlement.bill.vouchers.is_empty() => {
                // A voucher may have run out.
                self.subsidies
                    .changed(&outcome.settlement.bill.usage.tenant);
            }
            Ok(_) => {}
            Err(e) => error!(lease = %lease, error = %e, "could not settle a lease"),
        }
    }

    /// Holds a newly placed lease's cost after subsidy, for its whole duration, against its
    /// tenant's budget until it is settled, so that later submissions see it. Only tenants
    /// with a budget are held.
    fn hold(&mut self, record: &pb::Request, now: u64) {
        if !self.has_budget(&record.tenant) {
            return;
        }
        let Some(usage) = billing::placed_usage(&self.engine, record) else {
            return;
        };
        let lease = usage.lease.clone();
        let held = self.ledger.quote(&usage).and_then(|bill| {
            self.ledger
                .place_hold(lease.clone(), &record.tenant, bill.tenant_due, now)
        });
        if let Err(e) = held {
            error!(lease = %lease, error = %e, "could not hold a lease against its budget");
        }
    }

    /// Applies and logs commands before the writer runs (registering the fleet, tenants) and
    /// issues start-up tokens (see [`primary_name`]); returns the tokens issued, with their
    /// secrets, for the credentials file.
    pub fn bootstrap(
        &mut self,
        commands: Vec<Command>,
        grants: Vec<(Principal, String)>,
    ) -> Result<Vec<(Principal, String)>, BrokerError> {
        let now = self.clock();
        let mut entries = Vec::new();
        for c in commands {
            if let Err(e) = self.apply_logged(c, now, None, &mut entries) {
                return Err(BrokerError::Config(format!(
                    "start-up command rejected: {e}"
                )));
            }
        }
        for (principal, secret) in &grants {
            let record = self.primary_token(principal.clone(), secret, now);
            self.tokens.issue(record.clone());
            entries.push(Entry::TokenIssued { record, key: None });
        }
        self.store.append(&entries)?;
        self.publish(now, true);
        Ok(grants)
    }

    /// Whether an operator may create `record` at `now`: its name free (revoked tokens keep
    /// theirs), its owner known, its expiry ahead.
    fn may_create(&self, record: &TokenRecord, now: u64) -> Result<(), BrokerError> {
        if self.tokens.get(&record.name).is_some() {
            return Err(BrokerError::AlreadyExists(format!(
                "token {} exists (revoked tokens keep their names)",
                record.name
            )));
        }
        match &record.principal {
            Principal::Operator => {}
            Principal::Tenant(t) => {
                if self.engine.tenant_usage(t).is_none() {
                    return Err(BrokerError::NotFound(format!("tenant {t} not found")));
                }
            }
            Principal::Agent(p) => {
                if self.engine.pool_spec(p).is_none() {
                    return Err(BrokerError::NotFound(format!("pool {p} not found")));
                }
            }
        }
        if let Some(at) = record.expires_ms
            && at <= now
        {
            return Err(BrokerError::field(
                "expires_unix_ms",
                "in the past: a token must expire after it is created",
            ));
        }
        Ok(())
    }

    /// Refuses a submission while its tenant, or the whole queue, has as many requests
    /// waiting as the configuration allows: under overload the excess is shed at once
    /// instead of growing the queue (and memory) without bound.
    fn room_to_wait(&self, tenant: &str) -> Result<(), BrokerError> {
        let (mine, all) = self.engine.waiting(tenant);
        let (per_tenant, total) = (self.config.max_waiting_per_tenant, self.config.max_waiting);
        if mine >= per_tenant {
            return Err(BrokerError::QueueFull(format!(
                "tenant {tenant} has {mine} requests waiting, the most a tenant may have \
                 ({per_tenant}): submit again when some have started or been cancelled"
            )));
        }
        if all >= total {
            return Err(BrokerError::QueueFull(format!(
                "{all} requests are waiting, the most the broker holds ({total}): submit again \
                 later"
            )));
        }
        Ok(())
    }

    /// A principal's start-up token with `secret`, issued at `now`.
    fn primary_token(&self, principal: Principal, secret: &str, now: u64) -> TokenRecord {
        TokenRecord {
            name: primary_name(&principal),
            principal,
            hash: hash_secret(secret),
            created_ms: now,
            expires_ms: None,
            revoked_ms: None,
        }
    }

    fn clock(&mut self) -> u64 {
        self.now = self.now.max(wall_ms());
        self.now
    }

    /// Applies a command, logs it unless rejected, and follows up (simulated starts).
    fn apply_logged(
        &mut self,
        command: Command,
        now: u64,
        key: Option<IdemKey>,
        entries: &mut Vec<Entry>,
    ) -> Result<Vec<Event>, BrokerError> {
        let synced = self.before_command(now);
        // A command not logged after all: what syncing changed is logged on its own.
        let refused = |e: BrokerError, entries: &mut Vec<Entry>| {
            if synced {
                entries.push(Entry::Synced { now });
            }
            Err(e)
        };
        if let Command::Submit(spec) = &command
            && self.live
            && let Err(e) = self.check_budget(spec, now)
        {
            return refused(e, entries);
        }
        self.note(&command);
        let events = self.decide(command.clone(), now);
        if matches!(events[..], [Event::Rejected { .. }]) {
            self.submitting = None;
            self.finishing = None;
        }
        if let [Event::Rejected { error }] = &events[..] {
            return refused(error.clone().into(), entries);
        }
        entries.push(Entry::Command { now, command, key });
        self.process(&events, now);
        while let Some(next) = self.followups.pop() {
            self.before_command(now);
            let more = self.decide(next.clone(), now);
            if !matches!(more[..], [Event::Rejected { .. }]) {
                entries.push(Entry::Command {
                    now,
                    command: next,
                    key: None,
                });
                self.process(&more, now);
            }
        }
        Ok(events)
    }

    /// Keeps what a command carries for the records that its events change but the engine
    /// does not keep: a submission's spec, a job's outcome.
    fn note(&mut self, command: &Command) {
        match command {
            Command::Submit(spec) => self.submitting = Some(spec.clone()),
            Command::LeaseFinished { outcome, .. } => self.finishing = Some(outcome.clone()),
            _ => {}
        }
    }

    /// Applies a command to the engine, counting and timing the decision.
    fn decide(&mut self, command: Command, now: u64) -> Vec<Event> {
        let kind = metrics::command_kind(&command);
        let started = Instant::now();
        let events = self.engine.apply(command, now);
        let rejected = matches!(events[..], [Event::Rejected { .. }]);
        self.metrics.decided(kind, started.elapsed(), rejected);
        events
    }

    /// Brings the views up to date with events, and (when live) acts on them.
    fn process(&mut self, events: &[Event], now: u64) {
        for ev in events {
            if self.live {
                self.metrics.event(ev);
            }
            let (id, kind) = match *ev {
                Event::Submitted { request } => (request, pb::RequestEventKind::Submitted),
                Event::Placed { request } => (request, pb::RequestEventKind::Placed),
                Event::Started { request } => (request, pb::RequestEventKind::Started),
                Event::Requeued { request, .. } => (request, pb::RequestEventKind::Requeued),
                Event::Ended { request, .. } => (request, pb::RequestEventKind::Ended),
                _ => continue,
            };
            let previous = self.views.requests.get(&id.0).map(|r| r.clone());
            let record = match (ev, self.engine.request(id)) {
                (Event::Ended { state, reason, .. }, _) => {
                    let Some(prev) = &previous else { continue };
                    let mut r = (**prev).clone();
                    r.state = convert::state_to_pb(*state) as i32;
                    r.end_reason = convert::end_to_pb(*reason) as i32;
                    r.wait = None;
                    let outcome = self.finishing.take();
                    let runs_a_job = r.spec.as_ref().is_some_and(|s| s.workload.is_some());
                    if runs_a_job && matches!(reason, EndReason::Finished | EndReason::JobFailed) {
                        r.outcome = outcome.map(|o| convert::job_outcome_to_pb(&o));
                    } else if runs_a_job && *reason == EndReason::Expired {
                        // The pool stops it; the request's time is its time limit.
                        let duration = r.spec.as_ref().map_or(0, |s| s.duration_ms);
                        r.outcome = Some(pb::JobOutcome {
                            cause: pb::JobCause::TimedOut as i32,
                            message: format!(
                                "still running at the end of the request's duration ({} ms): stopped",
                                duration
                            ),
                            ..Default::default()
                        });
                    }
                    r.update_time_unix_ms = now;
                    r
                }
                (_, Some(view)) => {
                    let spec = match (&previous, self.submitting.take()) {
                        (Some(p), _) => p.spec.clone().unwrap_or_default(),
                        (None, Some(spec)) => convert::spec_to_pb(&spec),
                        (None, None) => convert::spec_to_pb(&self.engine_spec(&view)),
                    };
                    let mut r = convert::request_to_pb(&view, &spec, now);
                    if let Some(p) = &previous {
                        r.submit_time_unix_ms = p.submit_time_unix_ms;
                        r.leases = p.leases;
                    }
                    self.fix_lease(ev, &mut r, previous.as_deref(), now);
                    r
                }
                (_, None) => continue,
            };
            if previous.is_none() {
                self.views
                    .by_tenant
                    .entry(record.tenant.clone())
                    .or_default()
                    .push(id.0);
            }
            if matches!(ev, Event::Ended { .. } | Event::Requeued { .. }) {
                self.settle(previous.as_deref(), now);
            }
            if matches!(ev, Event::Placed { .. }) {
                self.hold(&record, now);
                if self.live {
                    // Queued since its submission or its requeue, the last change of its record.
                    let queued_at = previous
                        .as_deref()
                        .filter(|p| p.state == pb::RequestState::Queued as i32)
                        .map_or(now, |p| p.update_time_unix_ms);
                    self.metrics.waited(now.saturating_sub(queued_at));
                }
            }
            if matches!(ev, Event::Ended { .. }) {
                self.ended.push_back((now, id.0));
                if record.outcome.is_some() {
                    self.views.job_ended(id.0);
                }
            }
            if self.live && self.watch.receiver_count() > 0 {
                self.pending_watch.push(Arc::new(WatchEvent {
                    tenant: record.tenant.clone(),
                    event: pb::RequestEvent {
                        request: Some(record.clone()),
                        kind: kind as i32,
                        time_unix_ms: now,
                    },
                }));
            }
            self.metrics
                .moved(previous.as_ref().map(|p| p.state), record.state);
            let record = Arc::new(record);
            self.views.requests.insert(id.0, record.clone());
            // After the views show the change: an agent told to start a lease may report it
            // started at once, and its report is read against the views.
            if self.live {
                self.act(ev, &record, previous.as_deref(), now);
            }
        }
    }

    /// Keeps what a lease's record must not lose when it is rebuilt from the engine: a new
    /// placement fixes each part's price and counts the lease; later records keep them, and
    /// the start of running is the time the broker applied the start.
    fn fix_lease(&self, ev: &Event, r: &mut pb::Request, previous: Option<&pb::Request>, now: u64) {
        let Some(lease) = r.lease.as_mut() else {
            return;
        };
        if matches!(ev, Event::Placed { .. }) {
            // A new lease, even when the engine requeued and placed again in one decision.
            r.leases += 1;
            lease.running_since_unix_ms = None;
            for part in &mut lease.parts {
                let pool = self.engine.pool_spec(&part.pool);
                part.price_fen_per_device_hour = pool
                    .and_then(|s| s.groups.get(part.group as usize))
                    .map_or(0, |g| g.price_fen_per_device_hour);
                part.billing_increment_s = pool.and_then(|s| s.billing_increment_s);
            }
            return;
        }
        if let Some(before) = previous.and_then(|p| p.lease.as_ref()) {
            for (part, was) in lease.parts.iter_mut().zip(&before.parts) {
                part.price_fen_per_device_hour = was.price_fen_per_device_hour;
                part.billing_increment_s = was.billing_increment_s;
            }
            lease.running_since_unix_ms = before.running_since_unix_ms;
        }
        if matches!(ev, Event::Started { .. }) {
            lease.running_since_unix_ms = Some(now);
        }
    }

    /// Forgets ended requests past the retention time, and the oldest beyond the most kept.
    fn forget_ended(&mut self, now: u64) {
        let keep_from = now.saturating_sub(self.config.ended_retention.as_millis() as u64);
        let mut gone: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        while let Some(&(at, id)) = self.ended.front() {
            if at >= keep_from && self.ended.len() <= self.config.ended_max {
                break;
            }
            self.ended.pop_front();
            if let Some((_, r)) = self.views.requests.remove(&id) {
                gone.entry(r.tenant.clone()).or_default().push(id);
            }
        }
        for (tenant, mut ids) in gone {
            if let Some(mut list) = self.views.by_tenant.get_mut(&tenant) {
                ids.sort_unstable();
                list.retain(|id| ids.binary_search(id).is_err());
            }
        }
    }

    /// The spec of a request the views have not seen and whose submission is not at hand:
    /// what the engine keeps of it.
    fn engine_spec(&self, view: &suanli_core::query::RequestView) -> RequestSpec {
        RequestSpec {
            tenant: view.tenant.clone(),
            shape: view.shape,
            duration_ms: view.duration_ms,
            priority: view.priority,
            constraints: Default::default(),
            policy: None,
            start_after_ms: None,
            deadline_ms: None,
            requeue: false,
            workload: None,
        }
    }

    /// Carries out a lease change: simulated pools start and finish leases themselves; agent
    /// pools are told.
    fn act(&mut self, ev: &Event, record: &pb::Request, previous: Option<&pb::Request>, now: u64) {
        match ev {
            Event::Placed { request } => {
                let Some(lease) = &record.lease else { return };
                let mut pools: Vec<&str> = lease.parts.iter().map(|p| p.pool.as_str()).collect();
                pools.sort_unstable();
                pools.dedup();
                let simulated = pools
                    .iter()
                    .all(|p| self.config.execution(p) == Some(Execution::Simulated));
                if simulated {
                    self.followups
                        .push(Command::LeaseStarted { request: *request });
                    let run = (lease.end_unix_ms - lease.start_unix_ms) as f64
                        / self.config.simulated_speedup;
                    self.timers.push(Reverse((now + run as u64, request.0)));
                } else {
                    for pool in pools {
                        self.tell_agent(pool, start_lease(record, lease, pool));
                    }
                }
            }
            Event::Ended {
                request, reason, ..
            }
            | Event::Requeued { request, reason } => {
                let reported = matches!(reason, EndReason::Finished | EndReason::JobFailed);
                let Some(lease) = previous.and_then(|p| p.lease.as_ref()) else {
                    return;
                };
                if previous.is_some_and(|p| p.state == pb::RequestState::Queued as i32) {
                    return;
                }
                let mut pools: Vec<&str> = lease.parts.iter().map(|p| p.pool.as_str()).collect();
                pools.sort_unstable();
                pools.dedup();
                // A lease ends when one of its pools reports its part done: the parts on other
                // pools are stopped (the reporting agent ignores a stop for a job it has ended).
                if reported && pools.len() < 2 {
                    return;
                }
                for pool in pools {
                    self.tell_agent(
                        pool,
                        pb::BrokerMessage {
                            body: Some(pb::broker_message::Body::StopLease(pb::StopLease {
                                request: request.0,
                                reason: convert::end_to_pb(*reason) as i32,
                            })),
                        },
                    );
                }
            }
            _ => {}
        }
    }

    fn tell_agent(&mut self, pool: &str, msg: pb::BrokerMessage) {
        let gone = match self.agents.get(pool) {
            Some(link) => link.tx.try_send(msg).is_err(),
            None => false, // told again when it connects (see `agent_hello`)
        };
        if gone {
            warn!(
                pool,
                "agent link closed or full; it will be reconciled when it reconnects"
            );
            self.agents.remove(pool);
        }
    }

    fn agent_hello(
        &mut self,
        pool: String,
        running: Vec<u64>,
        runtimes: Runtimes,
        tx: mpsc::Sender<pb::BrokerMessage>,
        now: u64,
        entries: &mut Vec<Entry>,
    ) {
        let welcome = pb::BrokerMessage {
            body: Some(pb::broker_message::Body::Welcome(pb::Welcome {
                pool: pool.clone(),
                heartbeat_interval_ms: self.config.heartbeat_interval.as_millis() as u64,
                time_unix_ms: now,
            })),
        };
        if tx.try_send(welcome).is_err() {
            return;
        }
        let lost = self
            .views
            .snapshot()
            .pools
            .iter()
            .any(|p| p.id == pool && p.health == pb::PoolHealth::Lost as i32);
        if lost
            && let Err(e) = self.apply_logged(
                Command::RestorePool { pool: pool.clone() },
                now,
                None,
                entries,
            )
        {
            warn!(pool, error = %e, "could not restore the pool");
        }
        if self.engine.pool_runtimes(&pool) != Some(runtimes) {
            let set = Command::SetPoolRuntimes {
                pool: pool.clone(),
                runtimes,
            };
            if let Err(e) = self.apply_logged(set, now, None, entries) {
                warn!(pool, error = %e, "could not set the pool's runtimes");
            }
        }
        self.agents.insert(
            pool.clone(),
            AgentLink {
                tx,
                last_heartbeat: now,
            },
        );
        // Reconcile: start what the agent lacks, stop what is no longer live.
        let mut live_here = Vec::new();
        for id in self.engine.live_requests() {
            let Some(r) = self.views.requests.get(&id.0).map(|r| r.clone()) else {
                continue;
            };
            if let Some(lease) = &r.lease {
                let on_pool = lease.parts.iter().any(|p| p.pool == pool);
                if on_pool && r.state != pb::RequestState::Queued as i32 {
                    live_here.push(id.0);
                    if !running.contains(&id.0) {
                        self.tell_agent(&pool, start_lease(&r, lease, &pool));
                    }
                }
            }
        }
        for id in running.into_iter().filter(|id| !live_here.contains(id)) {
            self.tell_agent(
                &pool,
                pb::BrokerMessage {
                    body: Some(pb::broker_message::Body::StopLease(pb::StopLease {
                        request: id,
                        reason: pb::EndReason::Unspecified as i32,
                    })),
                },
            );
        }
    }

    fn check_heartbeats(&mut self, now: u64, entries: &mut Vec<Entry>) {
        let timeout = self.config.heartbeat_timeout.as_millis() as u64;
        let snapshot = self.views.snapshot();
        for pool in snapshot.pools.iter() {
            if self.config.execution(&pool.id) != Some(Execution::Agent)
                || pool.health == pb::PoolHealth::Lost as i32
            {
                continue;
            }
            let last = self
                .agents
                .get(&pool.id)
                .map_or(self.started_at, |a| a.last_heartbeat);
            if now.saturating_sub(last) > timeout {
                warn!(
                    pool = pool.id,
                    silent_ms = now - last,
                    "agent silent: pool lost"
                );
                self.agents.remove(&pool.id);
                let _ = self.apply_logged(
                    Command::LosePool {
                        pool: pool.id.clone(),
                    },
                    now,
                    None,
                    entries,
                );
            }
        }
    }

    fn fire_timers(&mut self, now: u64, entries: &mut Vec<Entry>) {
        while let Some(&Reverse((due, id))) = self.timers.peek() {
            if due > now {
                break;
            }
            self.timers.pop();
            let still_running = self
                .engine
                .request(RequestId(id))
                .is_some_and(|r| r.state.is_live_lease());
            if still_running {
                let finish = Command::LeaseFinished {
                    request: RequestId(id),
                    outcome: JobOutcome::bare(JobCause::Completed),
                };
                let _ = self.apply_logged(finish, now, None, entries);
            }
        }
    }

    /// Re-arms the finish timers of simulated leases that were running before a restart.
    fn rearm_timers(&mut self) {
        for id in self.engine.live_requests() {
            let Some(view) = self.engine.request(id) else {
                continue;
            };
            let Some(lease) = &view.lease else { continue };
            let simulated = lease
                .parts
                .iter()
                .all(|p| self.config.execution(&p.pool) == Some(Execution::Simulated));
            if simulated {
                let run = (lease.end - lease.start) as f64 / self.config.simulated_speedup;
                self.timers.push(Reverse((lease.start + run as u64, id.0)));
            }
        }
    }

    /// Publishes the snapshot views. A short queue's entries are rebuilt each time; a long
    /// queue's, and everyone's start estimates, only at the paced rebuilds (see
    /// `next_queue_publish`).
    fn publish(&mut self, now: u64, force_queue: bool) {
        self.last_publish = now;
        self.last_publish_at = Instant::now();
        self.publish_due = false;
        self.quick_publish = false;
        let usage = self.engine.fleet_usage();
        let mut pools = Vec::with_capacity(usage.pools.len());
        let mut health = pb::PoolHealthCounts::default();
        for p in &usage.pools {
            match p.health {
                PoolHealth::Healthy => health.healthy += 1,
                PoolHealth::Draining => health.draining += 1,
                PoolHealth::Lost => health.lost += 1,
            }
            if let Some(spec) = self.engine.pool_spec(&p.id) {
                pools.push(convert::pool_to_pb(spec, p));
            }
        }
        let queue_len = self.engine.queue_len();
        let paced = force_queue || now >= self.next_queue_publish;
        let queue = if paced || queue_len < 2000 {
            let rebuilt = Instant::now();
            let entries: Vec<Queued> = self
                .engine
                .queued()
                .into_iter()
                .map(|q| Queued {
                    id: q.id.0,
                    priority: convert::priority_to_pb(q.priority),
                    reason: convert::reason_to_pb(q.reason),
                    position: q.position,
                })
                .collect();
            // Estimates walk every live lease: not on every publication of a short queue,
            // which keeps the last ones until the next paced rebuild.
            let starts = if paced {
                let head: Vec<RequestId> = entries
                    .iter()
                    .take(ESTIMATED_STARTS)
                    .map(|q| RequestId(q.id))
                    .collect();
                self.engine
                    .estimated_starts(&head)
                    .into_iter()
                    .filter_map(|(id, at)| Some((id.0, at?)))
                    .collect()
            } else {
                self.views.snapshot().queue.starts.clone()
            };
            let view = Arc::new(QueueView::new(entries, starts));
            if paced {
                let cost = rebuilt.elapsed().as_millis() as u64;
                self.next_queue_publish = now + (cost * REBUILD_SHARE).max(QUEUE_VIEW_EVERY_MS);
            }
            view
        } else {
            self.views.snapshot().queue.clone()
        };
        let (total, by_model, by_region, by_kind) = convert::fleet_to_pb(&usage);
        let fleet = pb::FleetSummary {
            time_unix_ms: now,
            total: Some(total),
            local: Some(convert::utilisation_to_pb(&usage.local)),
            external: Some(convert::utilisation_to_pb(&usage.external)),
            by_model,
            by_region,
            by_kind,
            pools: Some(health),
            live_leases: self.engine.live_lease_count() as u32,
            queue: Some(pb::QueueSummary {
                length: queue_len as u32,
                by_priority: [
                    pb::Priority::Critical,
                    pb::Priority::Standard,
                    pb::Priority::Spot,
                ]
                .iter()
                .zip(queue.by_priority)
                .map(|(p, count)| pb::PriorityCount {
                    priority: *p as i32,
                    count,
                })
                .collect(),
                by_reason: queue
                    .by_reason
                    .iter()
                    .map(|&(reason, count)| pb::WaitReasonCount { reason, count })
                    .collect(),
            }),
            target_tflops: self.config.target_tflops,
        };
        let tenants = self
            .engine
            .tenant_usages()
            .iter()
            .map(convert::tenant_to_pb)
            .collect();
        let reserved = self.engine.reservation().map(|(id, at)| (id.0, at));
        self.views.publish(Snapshot {
            fleet,
            pools,
            tenants,
            queue,
            reserved,
        });
    }

    /// Runs until every sender is gone (the server stopped), then returns the final digest and
    /// ledger. A broker on its own leads from the start; a replica of a group follows the
    /// log until it wins the election, and follows again when its term ends.
    pub fn run(mut self, rx: Receiver<Op>) -> WriterResult {
        if !self.replica.is_replicated() {
            self.lead(&rx)?;
        } else {
            loop {
                match self.follow(&rx) {
                    Next::Stop => break,
                    Next::Resync => self.rebuild_until_done(),
                    Next::Lead(term) => {
                        if let Err(e) = self.promote(term) {
                            warn!(term, error = %e, "could not take over; following again");
                            self.step_down(term);
                            self.rebuild_until_done();
                            continue;
                        }
                        let exit = self.lead(&rx);
                        self.step_down(term);
                        match exit? {
                            Exit::Stopped => break,
                            Exit::Deposed => {
                                warn!(term, "deposed: following again");
                                self.rebuild_until_done();
                            }
                        }
                    }
                }
            }
        }
        if let Some(h) = self.snapshotting.take() {
            Self::finished(h);
        }
        Ok((self.engine.digest(), self.ledger))
    }

    /// Leads: takes calls in batches, appends them, answers; until the server stops or (in a
    /// group) the term ends.
    fn lead(&mut self, rx: &Receiver<Op>) -> Result<Exit, BrokerError> {
        self.live = true;
        self.started_at = self.clock();
        self.rearm_timers();
        let interval = self.config.tick_interval.as_millis() as u64;
        let mut last_tick = self.started_at;
        // How soon after the last tick the next comes when the engine wants a pass.
        let mut soon = 1;
        let next_tick = |engine: &Engine, last_tick: u64, soon: u64| {
            last_tick + if engine.pass_wanted() { soon } else { interval }
        };
        let mut ops = Vec::new();
        loop {
            let mut wake = next_tick(&self.engine, last_tick, soon);
            if self.publish_due {
                wake = wake.min(self.last_publish + PUBLISH_EVERY_MS);
            }
            let mut wait = Duration::from_millis(wake.saturating_sub(wall_ms()));
            if self.publish_due && self.quick_publish {
                wait = wait.min(QUICK_PUBLISH_GAP.saturating_sub(self.last_publish_at.elapsed()));
            }
            if self.log_fault.is_some() {
                wait = wait.min(Duration::from_millis(
                    self.next_probe.saturating_sub(wall_ms()),
                ));
            }
            match rx.recv_timeout(wait) {
                Ok(op) => ops.push(op),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            while ops.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(op) => ops.push(op),
                    Err(_) => break,
                }
            }
            let now = self.clock();
            let started = Instant::now();
            let batch = ops.len();
            let mut entries = Vec::new();
            let mut replies = Vec::new();
            if self.log_fault.is_some() && now >= self.next_probe {
                self.probe_log(now);
            }
            for op in ops.drain(..) {
                if let Some(op) = self.turn_away(op) {
                    self.handle(op, now, &mut entries, &mut replies);
                }
            }
            let handled = started.elapsed();
            let mut tick_cost = Duration::ZERO;
            // Time stands still for the engine while nothing can be logged.
            if self.log_fault.is_none() && now >= next_tick(&self.engine, last_tick, soon) {
                let ticked = Instant::now();
                let _ = self.apply_logged(Command::Tick, now, None, &mut entries);
                self.check_heartbeats(now, &mut entries);
                tick_cost = ticked.elapsed();
                last_tick = now;
                soon = (tick_cost * SLICE_GAP).as_millis().max(1) as u64;
            }
            if self.log_fault.is_none() {
                self.fire_timers(now, &mut entries);
                self.forget_ended(now);
            }
            let applied = started.elapsed();
            let appended = if self.deposed {
                Err(BrokerError::NotLeader { leader: None })
            } else {
                self.store.append(&entries)
            };
            if let Err(BrokerError::NotLeader { leader }) = appended {
                // Nothing of this batch is answered: the log may or may not hold it, and the
                // next leader's state is what counts. Callers retry there with their ids.
                self.replica.leader_is(leader.clone());
                fail_all(replies, || BrokerError::NotLeader {
                    leader: leader.clone(),
                });
                self.live = false;
                return Ok(Exit::Deposed);
            }
            if let Err(e) = appended {
                if self.replica.is_replicated() {
                    error!(error = %e, "the command log failed: stopping the writer");
                    fail_all(replies, || BrokerError::Store(e.to_string()));
                    return Err(e);
                }
                self.log_failed(&e, replies);
                continue;
            }
            let synced = started.elapsed();
            if !entries.is_empty() {
                self.applied = self.store.next_index();
                self.replica.applied(self.applied, now);
            }
            self.metrics
                .batch(batch, entries.len(), applied, synced - applied);
            self.maybe_snapshot();
            // Under load the fleet views are republished at most every few milliseconds; at once
            // after a command that changes pools or tenants (its caller reads them back), and
            // then before the replies. Requests' own records are current already (`process`).
            let shapes_fleet = entries.iter().any(|e| {
                matches!(
                    e.command(),
                    Some(
                        Command::RegisterPool(_)
                            | Command::UpdatePool(_)
                            | Command::DrainPool { .. }
                            | Command::UndrainPool { .. }
                            | Command::LosePool { .. }
                            | Command::RestorePool { .. }
                            | Command::SetNodeHealth { .. }
                            | Command::SetTenant(_)
                    )
                )
            });
            if !entries.is_empty() {
                self.publish_due = true;
            }
            if shapes_fleet {
                self.publish(now, false);
            }
            for r in replies {
                match r {
                    Reply::Events(tx, result) => drop(tx.send(result)),
                    Reply::Unit(tx) => drop(tx.send(Ok(()))),
                    Reply::At(tx, at) => drop(tx.send(Ok(at))),
                    Reply::Read(read) => read(&self.ledger),
                    Reply::Checkpoint(tx, (at, digest)) => {
                        self.replica.record_checkpoint(at, digest);
                        drop(tx.send(Ok((at, digest))));
                    }
                }
            }
            for ev in self.pending_watch.drain(..) {
                let _ = self.watch.send(ev);
            }
            // A small batch (a broker not under load) republishes at once, or as soon as
            // QUICK_PUBLISH_GAP allows.
            if !entries.is_empty() && entries.len() < QUIET_BATCH {
                self.quick_publish = true;
            }
            let quick = self.quick_publish && self.last_publish_at.elapsed() >= QUICK_PUBLISH_GAP;
            if self.publish_due && (quick || now >= self.last_publish + PUBLISH_EVERY_MS) {
                self.publish(now, false);
            }
            if self.stopping {
                break;
            }
            let total = started.elapsed();
            if total >= SLOW_BATCH {
                debug!(
                    ops = batch,
                    entries = entries.len(),
                    apply_ms = applied.as_secs_f64() * 1e3,
                    calls_ms = handled.as_secs_f64() * 1e3,
                    tick_ms = tick_cost.as_secs_f64() * 1e3,
                    sync_ms = (synced - applied).as_secs_f64() * 1e3,
                    total_ms = total.as_secs_f64() * 1e3,
                    queued = self.engine.queue_len(),
                    "slow batch"
                );
            }
        }
        Ok(Exit::Stopped)
    }

    /// The command log could not take a batch (a broker on its own): its callers are told
    /// so, the state goes back to what the log holds (the batch was applied before it was
    /// appended), and calls that would log are refused until the log takes a write again.
    /// Reads of the ledger in the batch are answered from the state read back.
    fn log_failed(&mut self, e: &BrokerError, replies: Vec<Reply>) {
        let fault = LogFault::of(e);
        error!(
            error = %e,
            "the command log could not be written: refusing calls that change state until it can"
        );
        let (reads, calls): (Vec<_>, Vec<_>) = replies
            .into_iter()
            .partition(|r| matches!(r, Reply::Read(_)));
        fail_all(calls, || fault.error());
        self.metrics.log_failed();
        let stopping = self.stopping;
        // The agents' streams end with the old state's links: they come back, and are told
        // again what runs, as after a restart.
        self.rebuild_until_done();
        self.stopping = stopping;
        self.live = true;
        self.started_at = self.clock();
        self.rearm_timers();
        for r in reads {
            if let Reply::Read(read) = r {
                read(&self.ledger);
            }
        }
        self.next_probe = self.now + LOG_PROBE_MS;
        self.log_fault = Some(fault);
    }

    /// Tries the unwritable command log, once the store has room again (see
    /// [`Store::has_room`]), with a checkpoint (an entry that changes nothing): once it takes
    /// one, calls are taken again.
    fn probe_log(&mut self, now: u64) {
        let at = self.store.next_index();
        let tried = self
            .store
            .has_room()
            .and_then(|()| self.store.append(&[Entry::Checkpoint]));
        match tried {
            Ok(()) => {
                self.replica.record_checkpoint(at, self.engine.digest());
                self.applied = self.store.next_index();
                self.replica.applied(self.applied, now);
                self.metrics.log_writable();
                self.log_fault = None;
                info!(
                    index = at,
                    "the command log can be written again: taking calls"
                );
            }
            Err(e) => {
                self.log_fault = Some(LogFault::of(&e));
                self.next_probe = now + LOG_PROBE_MS;
            }
        }
    }

    /// While the command log cannot be written: answers an operation that would log with
    /// why, and gives back one that only reads (or steers the writer) to be handled; without
    /// a fault, gives back every operation.
    fn turn_away(&mut self, op: Op) -> Option<Op> {
        let Some(fault) = self.log_fault.clone() else {
            return Some(op);
        };
        // A quote is answered too: it logs what bringing vouchers up to date changed.
        match answer_with(op, || fault.error())? {
            Op::Refused { tag, reason } => {
                warn!(rpc = %tag.rpc, %reason, "a refused operator call could not be logged");
                None
            }
            // The hello logs the pool's state: its stream ends, and the agent comes back.
            Op::AgentHello { pool, .. } => {
                warn!(%pool, "an agent's hello could not be logged: its stream is closed");
                None
            }
            op => Some(op),
        }
    }

    /// Applies a caller's command, or answers a retry with its first result.
    fn apply_call(
        &mut self,
        command: Command,
        key: Option<IdemKey>,
        reply: oneshot::Sender<Result<Vec<Event>, BrokerError>>,
        now: u64,
        entries: &mut Vec<Entry>,
        replies: &mut Vec<Reply>,
    ) {
        match key.as_ref().map(|k| self.idem.get(k)) {
            Some(Ok(Some(first))) => {
                replies.push(Reply::Events(reply, Ok(first.clone())));
                return;
            }
            // Refused at once: nothing changes.
            Some(Err(e)) => return drop(reply.send(Err(e))),
            Some(Ok(None)) | None => {}
        }
        let result = self.apply_logged(command, now, key.clone(), entries);
        if let (Ok(events), Some(k)) = (&result, key) {
            self.idem.insert(k, events.clone(), now);
        }
        replies.push(Reply::Events(reply, result));
    }

    fn handle(&mut self, op: Op, now: u64, entries: &mut Vec<Entry>, replies: &mut Vec<Reply>) {
        match op {
            Op::Audited { tag, op } => {
                let first = entries.len();
                self.handle(*op, now, entries, replies);
                // The call's own first entry: a refused call may still have logged a sync.
                let own = entries[first..]
                    .iter()
                    .position(|e| !matches!(e, Entry::Synced { .. }));
                if let Some(entry) = own.and_then(|i| entries.get_mut(first + i)) {
                    let tag = Arc::unwrap_or_clone(tag);
                    self.trail.push(AuditRecord {
                        at: now,
                        tag: tag.clone(),
                        refused: String::new(),
                    });
                    let inner = std::mem::replace(entry, Entry::Checkpoint);
                    *entry = Entry::Audited {
                        at: now,
                        tag,
                        entry: Box::new(inner),
                    };
                }
            }
            Op::Refused { tag, reason } => {
                let record = AuditRecord {
                    at: now,
                    tag,
                    refused: reason,
                };
                self.trail.push(record.clone());
                entries.push(Entry::Refused(record));
            }
            // A leader's own appends come back through the tail: nothing to do. An append at
            // or past its own end is another leader's: this term is over.
            Op::Replicated { first, .. } => {
                if self.replica.is_replicated() && first >= self.store.next_index() {
                    warn!(first, "another replica appended to the log");
                    self.deposed = true;
                }
            }
            Op::Demote { term } => {
                if term == self.term {
                    self.deposed = true;
                }
            }
            Op::Promote { .. } | Op::Resync => {}
            Op::Checkpoint { reply } => {
                // The digest of the state after every entry before the checkpoint's.
                let at = self.store.next_index() + entries.len() as u64;
                let digest = self.engine.digest();
                entries.push(Entry::Checkpoint);
                replies.push(Reply::Checkpoint(reply, (at, digest)));
            }
            Op::Apply {
                command,
                key,
                reply,
            } => self.apply_call(command, key, reply, now, entries, replies),
            Op::Submit {
                spec,
                wait_for_pools,
                key,
                reply,
            } => {
                let retry = match key.as_ref().map(|k| self.idem.get(k)) {
                    Some(Err(e)) => return drop(reply.send(Err(e))),
                    Some(Ok(first)) => first.is_some(),
                    None => false,
                };
                if !retry
                    && !wait_for_pools
                    && let Err(e @ CoreError::Unsatisfiable { .. }) =
                        self.engine.check_satisfiable(&spec)
                {
                    // Nothing changes, so nothing is logged: answered at once.
                    drop(reply.send(Err(e.into())));
                    return;
                }
                if !retry && let Err(e) = self.room_to_wait(&spec.tenant) {
                    return drop(reply.send(Err(e)));
                }
                self.apply_call(Command::Submit(spec), key, reply, now, entries, replies);
            }
            Op::Grant {
                principal,
                token,
                reply,
            } => {
                let record = self.primary_token(principal, &token, now);
                self.tokens.issue(record.clone());
                entries.push(Entry::TokenIssued { record, key: None });
                replies.push(Reply::Unit(reply));
            }
            Op::CreateToken {
                mut record,
                key,
                reply,
            } => {
                match key.as_ref().map(|k| self.idem.get(k)) {
                    Some(Ok(Some(_))) => {
                        return drop(reply.send(Err(BrokerError::FailedPrecondition(format!(
                            "token {} was created by this request_id; its secret is shown \
                             only once: revoke it and create another",
                            record.name
                        )))));
                    }
                    Some(Err(e)) => return drop(reply.send(Err(e))),
                    Some(Ok(None)) | None => {}
                }
                if let Err(e) = self.may_create(&record, now) {
                    return drop(reply.send(Err(e)));
                }
                record.created_ms = now;
                self.tokens.issue(record.clone());
                if let Some(k) = key.clone() {
                    self.idem.insert(k, Vec::new(), now);
                }
                entries.push(Entry::TokenIssued { record, key });
                replies.push(Reply::Unit(reply));
            }
            Op::RevokeToken { name, key, reply } => {
                match key.as_ref().map(|k| self.idem.get(k)) {
                    Some(Ok(Some(_))) => return replies.push(Reply::Unit(reply)),
                    Some(Err(e)) => return drop(reply.send(Err(e))),
                    Some(Ok(None)) | None => {}
                }
                match self.tokens.get(&name) {
                    None => drop(reply.send(Err(BrokerError::NotFound(format!(
                        "token {name} not found"
                    ))))),
                    // Nothing changes: answered with the batch, after what revoked it.
                    Some(r) if r.revoked_ms.is_some() => replies.push(Reply::Unit(reply)),
                    Some(_) => {
                        self.tokens.revoke(&name, now);
                        if let Some(k) = key.clone() {
                            self.idem.insert(k, Vec::new(), now);
                        }
                        entries.push(Entry::TokenRevoked { name, at: now, key });
                        replies.push(Reply::Unit(reply));
                    }
                }
            }
            Op::Quote { spec, reply } => {
                // As a submission at `now` would see it; what syncing changed is logged, so
                // that replay changes it the same way.
                if self.sync_subsidies(now) {
                    entries.push(Entry::Synced { now });
                }
                let _ = reply.send(self.quote(&spec, now));
            }
            Op::Billing { op, key, reply } => {
                if let Some(k) = key.as_ref() {
                    match self.idem.get(k) {
                        // Answered with the batch: the first time may be in this very batch,
                        // not durable yet.
                        Ok(Some(_)) => {
                            let at = self.idem.first_at(k).unwrap_or(now);
                            return replies.push(Reply::At(reply, at));
                        }
                        Err(e) => return drop(reply.send(Err(e))),
                        Ok(None) => {}
                    }
                }
                match self.apply_billing(op.clone(), now) {
                    Ok(()) => {
                        if let Some(k) = key.clone() {
                            self.idem.insert(k, Vec::new(), now);
                        }
                        entries.push(Entry::Billing { now, op, key });
                        replies.push(Reply::At(reply, now));
                    }
                    Err(e) => drop(reply.send(Err(e))),
                }
            }
            Op::ReadLedger(read) => replies.push(Reply::Read(read)),
            Op::AgentHello {
                pool,
                running,
                runtimes,
                tx,
            } => self.agent_hello(pool, running, runtimes, tx, now, entries),
            Op::Heartbeat { pool } => {
                if let Some(a) = self.agents.get_mut(&pool) {
                    a.last_heartbeat = now;
                }
            }
            Op::Stop => self.stopping = true,
        }
    }
}

/// Answers an operation that waits for a reply (an operator's call within) with `error`;
/// gives back any other (a read of the ledger, an agent's hello, a refused call's record, or
/// one that steers the writer) for the caller to deal with.
fn answer_with(op: Op, error: impl Fn() -> BrokerError) -> Option<Op> {
    match op {
        Op::Apply { reply, .. } | Op::Submit { reply, .. } => drop(reply.send(Err(error()))),
        Op::Grant { reply, .. } | Op::CreateToken { reply, .. } | Op::RevokeToken { reply, .. } => {
            drop(reply.send(Err(error())))
        }
        Op::Billing { reply, .. } => drop(reply.send(Err(error()))),
        Op::Quote { reply, .. } => drop(reply.send(Err(error()))),
        Op::Checkpoint { reply } => drop(reply.send(Err(error()))),
        Op::Audited { op, .. } => return answer_with(*op, error),
        op => return Some(op),
    }
    None
}

/// Answers every caller of a batch that was not made durable with `error`; a read of the
/// ledger is dropped unanswered (its caller sees the writer stopped or moved).
fn fail_all(replies: Vec<Reply>, error: impl Fn() -> BrokerError) {
    for r in replies {
        match r {
            Reply::Events(tx, _) => drop(tx.send(Err(error()))),
            Reply::Unit(tx) => drop(tx.send(Err(error()))),
            Reply::At(tx, _) => drop(tx.send(Err(error()))),
            Reply::Checkpoint(tx, _) => drop(tx.send(Err(error()))),
            Reply::Read(_) => {}
        }
    }
}

/// The StartLease for the parts of a lease on one pool: its workload, and each part's node
/// rank in the whole lease (its index in the lease's parts, which are in pool, group and node
/// order).
fn start_lease(record: &pb::Request, lease: &pb::Lease, pool: &str) -> pb::BrokerMessage {
    let (node_ranks, parts): (Vec<u32>, Vec<pb::LeasePart>) = lease
        .parts
        .iter()
        .enumerate()
        .filter(|(_, p)| p.pool == pool)
        .map(|(rank, p)| (rank as u32, p.clone()))
        .unzip();
    pb::BrokerMessage {
        body: Some(pb::broker_message::Body::StartLease(pb::StartLease {
            request: record.id,
            tenant: record.tenant.clone(),
            parts,
            start_unix_ms: lease.start_unix_ms,
            end_unix_ms: lease.end_unix_ms,
            lease: record.leases,
            workload: record.spec.as_ref().and_then(|s| s.workload.clone()),
            num_nodes: lease.parts.len() as u32,
            node_ranks,
        })),
    }
}

/// What the writer thread ends with: the final engine digest and ledger.
pub(crate) type WriterResult = Result<(u64, Ledger), BrokerError>;

/// Starts the writer thread; returns the services' handle and the thread's join handle.
pub(crate) fn spawn(
    writer: Writer,
    capacity: usize,
) -> (Handle, std::thread::JoinHandle<WriterResult>) {
    let (tx, rx) = std::sync::mpsc::sync_channel(capacity);
    let join = std::thread::Builder::new()
        .name("suanli-writer".into())
        .spawn(move || writer.run(rx))
        .expect("spawn the writer thread");
    (Handle { tx, audit: None }, join)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_encoded_in_parts_is_the_image_it_is_read_back_as() {
        use crate::snapshot::{Image, SNAPSHOT_FORMAT};
        use prost::Message as _;
        let mut idem = Idempotency::default();
        for (i, id) in ["a", "b", "c"].into_iter().enumerate() {
            let key = IdemKey {
                caller: "tenant-a".into(),
                request_id: id.into(),
                asked: 7 + i as u64,
            };
            let events = vec![Event::Placed {
                request: RequestId(i as u64),
            }];
            idem.insert(key, events, 1_000 + i as u64);
        }
        let mut ledger = Ledger::new();
        let voucher = suanli_billing::VoucherSpec {
            id: suanli_billing::VoucherId::new("FT-1"),
            tenant: "tenant-a".into(),
            face_value: suanli_billing::Fen(10_000),
            rate_bp: 5_000,
            per_lease_cap: None,
            scope: suanli_billing::VoucherScope::AllPools,
            valid_from: 0,
            valid_until: 10_000_000,
        };
        ledger.issue_voucher(voucher, 500).unwrap();
        let engine = Engine::new(Default::default(), suanli_core::Catalogue::builtin());
        let records = vec![
            Arc::new(pb::Request {
                id: 9,
                name: "tenants/tenant-a/requests/9".into(),
                ..Default::default()
            }),
            Arc::new(pb::Request {
                id: 3,
                tenant: "tenant-a".into(),
                ..Default::default()
            }),
        ];
        let ended = VecDeque::from([(800, 3)]);
        let capture = Capture {
            upto: 12,
            engine: engine.clone(),
            records: records.clone(),
            ended: ended.clone(),
            idempotency: postcard::to_allocvec(&idem).unwrap(),
            tokens: Vec::new(),
            trail: Vec::new(),
            now: 1_234,
            ledger: ledger.image(),
            last_size: Arc::default(),
        };
        let image = Image {
            engine,
            // By id, as the capture sorts them.
            records: vec![records[1].encode_to_vec(), records[0].encode_to_vec()],
            ended,
            idempotency: idem,
            tokens: Vec::new(),
            trail: Vec::new(),
            now: 1_234,
            ledger,
        };
        let mut whole = vec![SNAPSHOT_FORMAT];
        postcard::to_io(&image, &mut whole).unwrap();
        let parts = capture.encode().unwrap();
        assert_eq!(parts, whole);
        let back = Image::decode(12, &parts).unwrap();
        assert_eq!(back.requests().unwrap().len(), 2);
        assert_eq!(back.ledger.entries().len(), 1);
    }

    #[test]
    fn keys_of_older_snapshots_are_hashed_and_still_answer_retries() {
        let key = |id: &str, asked| IdemKey {
            caller: "tenant-a".into(),
            request_id: id.into(),
            asked,
        };
        let mut old = IdempotencyByName::default();
        let name = ("tenant-a".to_string(), "r-1".to_string());
        let events = vec![Event::Placed {
            request: RequestId(4),
        }];
        old.results.insert(name.clone(), (7, events.clone()));
        old.seen.push_back((1_500, name));
        let idem = Idempotency::from(old);
        assert_eq!(idem.get(&key("r-1", 7)).unwrap(), Some(&events));
        assert_eq!(idem.first_at(&key("r-1", 7)), Some(1_500));
        assert!(idem.get(&key("r-1", 8)).is_err(), "another call is refused");
        assert_eq!(idem.get(&key("r-2", 7)).unwrap(), None);
        // The caller is part of the slot: another tenant's "r-1" is another key, and the
        // caller's length keeps ("ab", "c") apart from ("a", "bc").
        let other = IdemKey {
            caller: "tenant-b".into(),
            ..key("r-1", 7)
        };
        assert_eq!(idem.get(&other).unwrap(), None);
        assert_ne!(slot("ab", "c"), slot("a", "bc"));
    }

    #[test]
    fn request_ids_are_remembered_for_the_window_then_forgotten() {
        let key = |s: &str| IdemKey {
            caller: "t".into(),
            request_id: s.into(),
            asked: 7,
        };
        let mut idem = Idempotency::default();
        idem.insert(
            key("a"),
            vec![Event::Placed {
                request: RequestId(1),
            }],
            1_000,
        );
        idem.insert(key("b"), vec![], 1_000 + IDEMPOTENCY_WINDOW_MS - 1);
        assert!(
            idem.get(&key("a")).unwrap().is_some(),
            "still within the window"
        );
        idem.insert(key("c"), vec![], 1_000 + IDEMPOTENCY_WINDOW_MS);
        assert!(
            idem.get(&key("a")).unwrap().is_none(),
            "24 h later it is forgotten"
        );
        assert!(idem.get(&key("b")).unwrap().is_some());
        assert_eq!(idem.seen.len(), 2);
    }

    #[test]
    fn beyond_the_most_keys_the_oldest_are_forgotten_first() {
        let key = |i: u32| IdemKey {
            caller: "t".into(),
            request_id: format!("r{i}"),
            asked: 7,
        };
        let mut idem = Idempotency::default();
        for i in 0..10 {
            idem.insert_keeping(key(i), vec![], 1_000 + u64::from(i), 4);
        }
        assert_eq!((idem.seen.len(), idem.results.len()), (4, 4));
        for i in 0..6 {
            assert!(idem.get(&key(i)).unwrap().is_none(), "r{i} forgotten");
        }
        for i in 6..10 {
            assert!(idem.get(&key(i)).unwrap().is_some(), "r{i} remembered");
        }
    }

    #[test]
    fn a_request_id_reused_for_another_call_is_refused_naming_it() {
        let key = |caller: &str, asked| IdemKey {
            caller: caller.into(),
            request_id: "r1".into(),
            asked,
        };
        let mut idem = Idempotency::default();
        idem.insert(key("t", 7), Vec::new(), 1_000);
        assert!(idem.get(&key("t", 7)).unwrap().is_some(), "a retry");
        let Err(e) = idem.get(&key("t", 8)) else {
            panic!("another call under the same request_id was taken for a retry");
        };
        let status = tonic::Status::from(e);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().contains("request_id") && status.message().contains("\"r1\""),
            "{}",
            status.message()
        );
        // Another caller's request_ids are its own.
        assert!(idem.get(&key("u", 8)).unwrap().is_none());
        // A key logged before calls were hashed matches any retry.
        let mut old = Idempotency::default();
        old.insert(key("t", 0), Vec::new(), 1_000);
        assert!(old.get(&key("t", 8)).unwrap().is_some());
    }

    #[test]
    fn a_full_command_queue_is_resource_exhausted_and_a_stopped_writer_unavailable() {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let h = Handle { tx, audit: None };
        h.heartbeat("p".into()).unwrap();
        let full = h.heartbeat("p".into()).unwrap_err();
        assert!(matches!(full, BrokerError::Overloaded(_)));
        assert_eq!(
            tonic::Status::from(full).code(),
            tonic::Code::ResourceExhausted
        );
        drop(rx);
        let stopped = h.heartbeat("p".into()).unwrap_err();
        assert_eq!(
            tonic::Status::from(stopped).code(),
            tonic::Code::Unavailable
        );
    }
}
