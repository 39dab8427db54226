//! The durable command log and its snapshots. Every command that changed the engine is appended,
//! in order, with the time it was applied at; a batch is one transaction and one sync (group
//! commit). Now and then the writer saves a snapshot of its whole state as of a log index; the
//! entries before it are dropped in the same transaction. On start the broker loads the latest
//! snapshot and replays the entries after it: the engine is deterministic, so the state it
//! recovers is the state it had.
//!
//! The [`Store`] trait is the seam where the replicated log in etcd ([`crate::ha::log`]) takes
//! the embedded store's place.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use suanli_core::Command;

use crate::auth::Principal;
use crate::error::BrokerError;

/// An idempotency key: who asked and the id they chose.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct IdemKey {
    /// The caller (tenant name, `operator`, or `agent:{pool}`).
    pub caller: String,
    /// The caller's request_id.
    pub request_id: String,
    /// What the call asked: a hash of its method and message (see
    /// `service::idem_key`). The same request_id with anything else is refused. 0 where
    /// an earlier format did not record it: any retry matches.
    #[serde(default)]
    pub asked: u64,
}

/// An idempotency key as entries of format 2 and snapshots of format 6 hold it, before keys
/// recorded what the call asked.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(crate) struct KeyBeforeAsked {
    pub caller: String,
    pub request_id: String,
}

impl From<KeyBeforeAsked> for IdemKey {
    fn from(k: KeyBeforeAsked) -> IdemKey {
        IdemKey {
            caller: k.caller,
            request_id: k.request_id,
            asked: 0,
        }
    }
}

/// A log entry of format 2: as [`Entry`], with keys of [`KeyBeforeAsked`]. The variants are
/// [`Entry`]'s, in its order.
#[derive(Serialize, Deserialize)]
enum EntryBeforeAsked {
    Command {
        now: u64,
        command: Command,
        key: Option<KeyBeforeAsked>,
    },
    Billing {
        now: u64,
        op: crate::billing::BillingOp,
        key: Option<KeyBeforeAsked>,
    },
    Credential {
        principal: Principal,
        token: String,
    },
    Checkpoint,
}

impl From<EntryBeforeAsked> for Entry {
    fn from(e: EntryBeforeAsked) -> Entry {
        match e {
            EntryBeforeAsked::Command { now, command, key } => Entry::Command {
                now,
                command,
                key: key.map(Into::into),
            },
            EntryBeforeAsked::Billing { now, op, key } => Entry::Billing {
                now,
                op,
                key: key.map(Into::into),
            },
            EntryBeforeAsked::Credential { principal, token } => {
                Entry::Credential { principal, token }
            }
            EntryBeforeAsked::Checkpoint => Entry::Checkpoint,
        }
    }
}

/// One entry of the log.
#[allow(clippy::large_enum_variant)] // entries are written and read one by one, never stored in bulk
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Entry {
    /// A command the engine applied at `now`.
    Command {
        /// Time it was applied at (unix ms).
        now: u64,
        /// The command.
        command: Command,
        /// The caller's idempotency key, if any.
        key: Option<IdemKey>,
    },
    /// An accounting command (a voucher issued, a budget set) applied at `now`; see
    /// [`crate::billing`].
    Billing {
        /// Time it was applied at (unix ms).
        now: u64,
        /// The command.
        op: crate::billing::BillingOp,
        /// The caller's idempotency key, if any.
        key: Option<IdemKey>,
    },
    /// A bearer token granted to a principal, in the clear, as logs before tokens were kept
    /// as hashes wrote it: read (it becomes the principal's start-up token), never written.
    Credential {
        /// Who it is for.
        principal: Principal,
        /// The token.
        token: String,
    },
    /// A checkpoint: each replica that applies it records its engine's digest there, so
    /// replicas can be compared at one log position. Changes nothing.
    Checkpoint,
    /// A token issued (at start-up, by SetTenant or by CreateToken): it replaces a token of
    /// the same name.
    TokenIssued {
        /// The token, with its secret's hash.
        record: crate::auth::TokenRecord,
        /// The caller's idempotency key, if any.
        key: Option<IdemKey>,
    },
    /// An operator's call that took effect: `entry`, what it caused, applied at `at`, with who
    /// called, which RPC, on what (see [`crate::trail`]).
    Audited {
        /// When (unix ms).
        at: u64,
        /// Who, which call, on what.
        tag: crate::trail::AuditTag,
        /// What the call logged.
        entry: Box<Entry>,
    },
    /// An operator's call that was refused: changes nothing but the trail.
    Refused(crate::trail::AuditRecord),
    /// The writer brought what it derives from the ledger (the vouchers the engine knows) up
    /// to date at `now` for a call that logged nothing else (a quote, a refused command).
    Synced {
        /// When (unix ms).
        now: u64,
    },
    /// A token revoked at `at` (unix ms).
    TokenRevoked {
        /// Its name.
        name: String,
        /// When.
        at: u64,
        /// The caller's idempotency key, if any.
        key: Option<IdemKey>,
    },
}

impl Entry {
    /// The engine's command this entry logs, if any (also inside an operator's audited call).
    pub fn command(&self) -> Option<&Command> {
        match self {
            Entry::Command { command, .. } => Some(command),
            Entry::Audited { entry, .. } => entry.command(),
            _ => None,
        }
    }
}

/// What recovery starts from.
#[derive(Debug, Default)]
pub struct Recovered {
    /// The latest snapshot: the log index it was taken at (the entries before it are in it)
    /// and its bytes.
    pub snapshot: Option<(u64, Vec<u8>)>,
    /// Every entry after the snapshot (or every entry), in order.
    pub entries: Vec<Entry>,
}

/// Where the log and the snapshots live. Shared by the writer, which appends, and the thread
/// that saves snapshots.
pub trait Store: Send + Sync {
    /// Appends a batch durably: when this returns, the entries survive a crash.
    fn append(&self, entries: &[Entry]) -> Result<(), BrokerError>;
    /// The index the next appended entry will have.
    fn next_index(&self) -> u64;
    /// Saves `snapshot`, the state after every entry before index `upto`, and drops those
    /// entries, atomically.
    fn save_snapshot(&self, upto: u64, snapshot: &[u8]) -> Result<(), BrokerError>;
    /// The latest snapshot and the entries after it.
    fn recover(&self) -> Result<Recovered, BrokerError>;
    /// Every entry from log index `index` to the end of the log, for a replica taking over;
    /// `None` when a snapshot dropped some of them (the replica must start from the
    /// snapshot). A store of one broker holds nothing this broker has not applied.
    fn read_from(&self, _index: u64) -> Result<Option<Vec<Entry>>, BrokerError> {
        Ok(Some(Vec::new()))
    }
    /// Whether there is room to write again after a failed write: a full disk that a small
    /// entry still fits (in pages the log freed) would take it and then fail the next batch.
    fn has_room(&self) -> Result<(), BrokerError> {
        Ok(())
    }
    /// This replica appends from index `next` on, under `term` (see [`crate::ha`]).
    fn lead(&self, _term: i64, _next: u64) {}
    /// This replica appends no more.
    fn resign(&self) {}
}

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
/// Snapshots by the log index they were taken at; only the latest is kept.
const SNAPSHOTS: TableDefinition<u64, &[u8]> = TableDefinition::new("snapshots");

/// The embedded store: a redb database (ACID, copy-on-write B-trees, one file).
///
/// After a failed write (a full disk), redb refuses every later transaction until the
/// database is opened again; the store does that itself, at once and then before each write
/// until it works, so the broker goes on when space returns. A failed commit is not in the
/// file: reopening goes back to the last whole one.
pub struct RedbStore {
    path: PathBuf,
    /// The data folder, whose file system's free space says when to write again.
    dir: PathBuf,
    /// `None` while it could not be opened again after a failed write.
    db: RwLock<Option<Database>>,
    /// Held through a write and its handling of a failure, so that one thread's failure
    /// (the snapshot's) is never taken for another's (the append's).
    writing: Mutex<()>,
    next: AtomicU64,
}

/// The first byte of a log entry in postcard form; an entry in JSON, as the first logs were
/// written, starts with `{`. Postcard is about a quarter of the JSON, and every byte is written
/// and synced before a reply. Postcard is not self-describing, so the byte is also the
/// entry's format: 3 since idempotency keys record what the call asked.
const POSTCARD: u8 = 3;
/// Entries from before idempotency keys recorded what the call asked: read as such.
const POSTCARD_BEFORE_ASKED: u8 = 2;
/// Postcard entries from before workloads: refused by name rather than misread.
const POSTCARD_BEFORE_WORKLOADS: u8 = 1;

pub(crate) fn encode(entry: &Entry) -> Result<Vec<u8>, BrokerError> {
    let mut bytes = vec![POSTCARD];
    postcard::to_io(entry, &mut bytes).map_err(store_err)?;
    Ok(bytes)
}

pub(crate) fn decode(index: u64, bytes: &[u8]) -> Result<Entry, BrokerError> {
    let bad = |e: &dyn std::fmt::Display| BrokerError::Store(format!("log entry {index}: {e}"));
    match bytes.split_first() {
        Some((&POSTCARD, rest)) => postcard::from_bytes(rest).map_err(|e| bad(&e)),
        Some((&POSTCARD_BEFORE_ASKED, rest)) => postcard::from_bytes::<EntryBeforeAsked>(rest)
            .map(Entry::from)
            .map_err(|e| bad(&e)),
        Some((&POSTCARD_BEFORE_WORKLOADS, _)) => Err(bad(
            &"written by an earlier version (entry format 1, before workloads); this broker \
              reads formats 2 and 3: start from a data folder of this version",
        )),
        Some((b'{', _)) => serde_json::from_slice(bytes).map_err(|e| bad(&e)),
        _ => Err(bad(&"neither postcard nor JSON")),
    }
}

/// What a caught panic said.
fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic without a message".into())
}

fn store_err(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Store(e.to_string())
}

/// A write that failed: [`BrokerError::LogUnwritable`], which says whether the disk is full.
fn write_err(e: impl Into<redb::Error>) -> BrokerError {
    let e: redb::Error = e.into();
    let full = matches!(
        &e,
        redb::Error::Io(io) if matches!(io.kind(), ErrorKind::StorageFull | ErrorKind::QuotaExceeded)
    );
    BrokerError::LogUnwritable {
        reason: e.to_string(),
        full,
    }
}

/// redb's page cache. The log is appended and read back only at start-up and by a replica
/// catching up, so a small cache serves it, and bounds what the cache may take as the log
/// grows (redb's default is 1 GiB). Throughput is the same with either (BENCHMARKS.md).
const STORE_CACHE_BYTES: usize = 64 * 1024 * 1024;

/// Free space the data folder needs before the log is written again after a failed write:
/// room for many batches and a snapshot's first pages, not just the next entry.
pub const LOG_HEADROOM_BYTES: u64 = 8 * 1024 * 1024;

impl RedbStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, BrokerError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| BrokerError::Store(format!("creating {}: {e}", dir.display())))?;
        let path = dir.join("log.redb");
        let db = Self::open_file(&path)?;
        let txn = db.begin_write().map_err(store_err)?;
        txn.open_table(LOG).map_err(store_err)?;
        txn.open_table(SNAPSHOTS).map_err(store_err)?;
        txn.commit().map_err(store_err)?;
        let next = Self::next_in(&db)?;
        Ok(RedbStore {
            path,
            dir: dir.to_path_buf(),
            db: RwLock::new(Some(db)),
            writing: Mutex::new(()),
            next: AtomicU64::new(next),
        })
    }

    /// The index after the last entry (or at the latest snapshot).
    fn next_in(db: &Database) -> Result<u64, BrokerError> {
        let txn = db.begin_read().map_err(store_err)?;
        let log = txn.open_table(LOG).map_err(store_err)?;
        let snapshots = txn.open_table(SNAPSHOTS).map_err(store_err)?;
        let after_log = log.last().map_err(store_err)?.map(|(k, _)| k.value() + 1);
        let at_snapshot = snapshots.last().map_err(store_err)?.map(|(k, _)| k.value());
        Ok(after_log.max(at_snapshot).unwrap_or(0))
    }

    /// Opens the file, verifying every page, and refuses a damaged one by name.
    fn open_file(path: &Path) -> Result<Database, BrokerError> {
        let damaged = |why: &dyn std::fmt::Display| {
            BrokerError::Store(format!(
                "{} is damaged ({why}): nothing is served from it; restore the data folder \
                 from a backup, or move it aside to start empty",
                path.display()
            ))
        };
        // redb trusts the pages it reads: a page damaged outside of it (a torn or altered
        // file) can make it panic. Every page's checksum is verified first, and a panic is
        // still turned into this refusal.
        let quiet = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut db = Database::builder()
                .set_cache_size(STORE_CACHE_BYTES)
                .create(path)?;
            let whole = db.check_integrity()?;
            Ok::<_, redb::Error>((db, whole))
        }));
        std::panic::set_hook(quiet);
        let db = match opened {
            Ok(Ok((db, true))) => db,
            Ok(Ok((db, false))) => {
                tracing::warn!(
                    path = %path.display(),
                    "the log file was damaged; redb repaired it to its last whole commit"
                );
                db
            }
            Ok(Err(redb::Error::DatabaseAlreadyOpen)) => {
                return Err(BrokerError::Store(format!(
                    "{} is open in another process: is a broker already running on this \
                     data folder?",
                    path.display()
                )));
            }
            Ok(Err(e)) => return Err(damaged(&e)),
            Err(panic) => return Err(damaged(&panic_message(&panic))),
        };
        Ok(db)
    }

    /// Runs a write transaction. After a failure the file is opened again (redb refuses
    /// every write after a failed one until then: the failure may have been another
    /// thread's) and the write is tried once more, so the error returned is this write's own.
    /// A failed transaction committed nothing, so trying again is safe.
    fn write<T>(&self, f: impl Fn(&Database) -> Result<T, BrokerError>) -> Result<T, BrokerError> {
        let _one_at_a_time = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        let attempt = || self.db.read().expect("store").as_ref().map(&f);
        if let Some(Ok(done)) = attempt() {
            return Ok(done);
        }
        self.reopen()?;
        let result = attempt().unwrap_or_else(|| {
            Err(BrokerError::LogUnwritable {
                reason: "the log file could not be opened again".into(),
                full: false,
            })
        });
        if result.is_err() {
            // Ready for the next write; if this fails, the next write opens it.
            if let Err(e) = self.reopen() {
                tracing::warn!(error = %e, "could not open the log file again after a failed write");
            }
        }
        result
    }

    /// Closes the database and opens it again, back at its last whole commit.
    fn reopen(&self) -> Result<(), BrokerError> {
        let mut db = self.db.write().expect("store");
        // The file is locked while a handle is open: the old one is closed first.
        drop(db.take());
        let opened = Self::open_file(&self.path).map_err(|e| match e {
            BrokerError::Store(reason) => BrokerError::LogUnwritable {
                reason,
                full: false,
            },
            e => e,
        })?;
        self.next.store(Self::next_in(&opened)?, Ordering::Release);
        *db = Some(opened);
        Ok(())
    }

    /// Reads with the open database.
    fn read<T>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, BrokerError>,
    ) -> Result<T, BrokerError> {
        if self.db.read().expect("store").is_none() {
            self.reopen()?;
        }
        let db = self.db.read().expect("store");
        match db.as_ref() {
            Some(db) => f(db),
            None => Err(BrokerError::Store("the log file is closed".into())),
        }
    }
}

impl Store for RedbStore {
    fn append(&self, entries: &[Entry]) -> Result<(), BrokerError> {
        if entries.is_empty() {
            return Ok(());
        }
        self.write(|db| {
            let next = self.next.load(Ordering::Acquire);
            let txn = db.begin_write().map_err(write_err)?;
            {
                let mut table = txn.open_table(LOG).map_err(write_err)?;
                for (i, e) in entries.iter().enumerate() {
                    let bytes = encode(e)?;
                    table
                        .insert(next + i as u64, bytes.as_slice())
                        .map_err(write_err)?;
                }
            }
            txn.commit().map_err(write_err)?;
            self.next
                .store(next + entries.len() as u64, Ordering::Release);
            Ok(())
        })
    }

    fn next_index(&self) -> u64 {
        self.next.load(Ordering::Acquire)
    }

    fn has_room(&self) -> Result<(), BrokerError> {
        let stat = rustix::fs::statvfs(&self.dir).map_err(|e| BrokerError::LogUnwritable {
            reason: format!(
                "the free space of {} cannot be read: {e}",
                self.dir.display()
            ),
            full: false,
        })?;
        let free = stat.f_bavail.saturating_mul(stat.f_frsize);
        if free < LOG_HEADROOM_BYTES {
            return Err(BrokerError::LogUnwritable {
                reason: format!(
                    "{} has {} KiB free; calls are taken again from {} KiB",
                    self.dir.display(),
                    free / 1024,
                    LOG_HEADROOM_BYTES / 1024
                ),
                full: true,
            });
        }
        Ok(())
    }

    fn save_snapshot(&self, upto: u64, snapshot: &[u8]) -> Result<(), BrokerError> {
        self.write(|db| {
            let txn = db.begin_write().map_err(write_err)?;
            {
                let mut snapshots = txn.open_table(SNAPSHOTS).map_err(write_err)?;
                snapshots.retain(|_, _| false).map_err(write_err)?;
                snapshots.insert(upto, snapshot).map_err(write_err)?;
                let mut log = txn.open_table(LOG).map_err(write_err)?;
                log.retain_in(..upto, |_, _| false).map_err(write_err)?;
            }
            txn.commit().map_err(write_err)
        })
    }

    fn recover(&self) -> Result<Recovered, BrokerError> {
        self.read(Self::recover_from)
    }
}

impl RedbStore {
    fn recover_from(db: &Database) -> Result<Recovered, BrokerError> {
        let txn = db.begin_read().map_err(store_err)?;
        let snapshots = txn.open_table(SNAPSHOTS).map_err(store_err)?;
        let snapshot = snapshots
            .last()
            .map_err(store_err)?
            .map(|(k, v)| (k.value(), v.value().to_vec()));
        let from = snapshot.as_ref().map_or(0, |(at, _)| *at);
        let table = txn.open_table(LOG).map_err(store_err)?;
        let mut entries = Vec::new();
        for item in table.range(from..).map_err(store_err)? {
            let (k, v) = item.map_err(store_err)?;
            entries.push(decode(k.value(), v.value())?);
        }
        Ok(Recovered { snapshot, entries })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appended_entries_survive_reopening_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let entries: Vec<Entry> = (0..5)
            .map(|i| Entry::Command {
                now: i,
                command: Command::Tick,
                key: None,
            })
            .collect();
        {
            let s = RedbStore::open(dir.path()).unwrap();
            s.append(&entries[..2]).unwrap();
            s.append(&entries[2..]).unwrap();
        }
        let s = RedbStore::open(dir.path()).unwrap();
        let r = s.recover().unwrap();
        assert_eq!(r.entries, entries);
        assert!(r.snapshot.is_none());
        assert_eq!(s.next_index(), 5);
    }

    #[test]
    fn entries_read_back_in_postcard_and_in_the_json_of_older_logs() {
        let entry = Entry::Command {
            now: 7,
            command: Command::Cancel {
                request: suanli_core::RequestId(3),
            },
            key: Some(IdemKey {
                caller: "tenant-a".into(),
                request_id: "c1".into(),
                asked: 42,
            }),
        };
        let compact = encode(&entry).unwrap();
        let json = serde_json::to_vec(&entry).unwrap();
        assert!(
            compact.len() * 2 < json.len(),
            "{} vs {} bytes",
            compact.len(),
            json.len()
        );
        assert_eq!(decode(0, &compact).unwrap(), entry);
        assert_eq!(decode(0, &json).unwrap(), entry);
        let err = decode(9, b"\x07junk").unwrap_err().to_string();
        assert!(err.contains("log entry 9"), "{err}");
        // An entry of format 2, from before keys recorded what the call asked, reads with
        // the key's `asked` unknown (0).
        let before = EntryBeforeAsked::Command {
            now: 7,
            command: Command::Cancel {
                request: suanli_core::RequestId(3),
            },
            key: Some(KeyBeforeAsked {
                caller: "tenant-a".into(),
                request_id: "c1".into(),
            }),
        };
        let mut old = vec![POSTCARD_BEFORE_ASKED];
        old.extend(postcard::to_stdvec(&before).unwrap());
        let Entry::Command { key: Some(key), .. } = decode(0, &old).unwrap() else {
            panic!("not the command");
        };
        assert_eq!((key.request_id.as_str(), key.asked), ("c1", 0));
        let old_json = br#"{"Command":{"now":7,"command":{"Cancel":{"request":3}},"key":{"caller":"a","request_id":"c1"}}}"#;
        let Entry::Command { key: Some(key), .. } = decode(0, old_json).unwrap() else {
            panic!("not the command");
        };
        assert_eq!(key.asked, 0);
    }

    #[test]
    fn a_damaged_log_file_is_refused_by_name_or_read_back_to_a_whole_batch() {
        let dir = tempfile::tempdir().unwrap();
        let entry = |i| Entry::Command {
            now: i,
            command: Command::Tick,
            key: None,
        };
        let entries: Vec<Entry> = (0..2_000).map(entry).collect();
        {
            let s = RedbStore::open(dir.path()).unwrap();
            for batch in entries.chunks(50) {
                s.append(batch).unwrap();
            }
        }
        let path = dir.path().join("log.redb");
        let whole = std::fs::read(&path).unwrap();
        // Deterministic places: cut the file there, or overwrite 512 bytes there.
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let (mut refused, mut read) = (0, 0);
        for case in 0..48 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let at = (x % whole.len() as u64) as usize;
            let mut damaged = whole.clone();
            if case % 2 == 0 {
                damaged.truncate(at);
            } else {
                for (i, b) in damaged[at..].iter_mut().take(512).enumerate() {
                    *b ^= 0x5a ^ (i as u8);
                }
            }
            std::fs::write(&path, &damaged).unwrap();
            match RedbStore::open(dir.path()).and_then(|s| s.recover()) {
                Err(e) => {
                    let e = e.to_string();
                    assert!(e.contains(&path.display().to_string()), "case {case}: {e}");
                    refused += 1;
                }
                Ok(r) => {
                    // Only what checksums prove: a prefix of the log, whole batches.
                    assert!(
                        r.entries.len() % 50 == 0,
                        "case {case}: {}",
                        r.entries.len()
                    );
                    assert_eq!(r.entries[..], entries[..r.entries.len()], "case {case}");
                    read += 1;
                }
            }
        }
        assert!(refused > 0, "no damage was noticed ({read} read back)");
    }

    #[test]
    fn a_snapshot_replaces_the_entries_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let entry = |i| Entry::Command {
            now: i,
            command: Command::Tick,
            key: None,
        };
        {
            let s = RedbStore::open(dir.path()).unwrap();
            s.append(&(0..4).map(entry).collect::<Vec<_>>()).unwrap();
            s.save_snapshot(3, b"first").unwrap();
            s.save_snapshot(4, b"state at 4").unwrap();
            s.append(&[entry(4), entry(5)]).unwrap();
        }
        let s = RedbStore::open(dir.path()).unwrap();
        let r = s.recover().unwrap();
        assert_eq!(
            r.snapshot,
            Some((4, b"state at 4".to_vec())),
            "only the latest"
        );
        assert_eq!(r.entries, vec![entry(4), entry(5)]);
        assert_eq!(s.next_index(), 6);
        // A snapshot of everything leaves an empty log, and the next index survives reopening.
        s.save_snapshot(6, b"all").unwrap();
        drop(s);
        let s = RedbStore::open(dir.path()).unwrap();
        assert_eq!(s.next_index(), 6);
        assert!(s.recover().unwrap().entries.is_empty());
    }
}
