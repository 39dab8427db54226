//! The command log and its snapshots in etcd.
//!
//! Under a prefix (`/suanli/` by default):
//! - `leader`: the election key, bound to the leader's lease; its creation revision is the
//!   leader's term;
//! - `log/{index:020}`: one group-commit batch (or a piece of one too large for one etcd
//!   request), keyed by the log index of its first entry; the value carries the term that
//!   wrote it;
//! - `snapshot/{upto:020}/{chunk:06}`: a snapshot's bytes in chunks, and `snapshot/latest`,
//!   which names the complete one.
//!
//! Every write of the leader is a transaction that holds only if the leader key still has the
//! leader's creation revision, and, for the log, if the position is still free. A deposed
//! leader therefore cannot write, whatever it believes. Saving a snapshot deletes the log
//! before it and compacts etcd's history, so etcd's space stays bounded.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use suanli_etcd::{Etcd, EtcdError, absent, created_at, delete_range, get, prefix_end, put};
use tracing::{debug, warn};

use crate::error::BrokerError;
use crate::store::{Entry, Recovered, Store, decode, encode};

/// The most log bytes one transaction carries: etcd refuses requests above 1.5 MiB by
/// default, and a transaction has keys and a header besides.
pub const MAX_PIECE_BYTES: usize = 1 << 20;
const _: () = assert!(MAX_PIECE_BYTES < suanli_etcd::MAX_REQUEST_BYTES);
/// Snapshot chunk size.
const CHUNK_BYTES: usize = 1 << 20;
/// Log keys read per page on recovery.
const PAGE_KEYS: i64 = 64;
/// The first byte of a log value: its format.
const PIECE_FORMAT: u8 = 1;

/// The keys of one group.
#[derive(Clone, Debug)]
pub struct Layout {
    prefix: String,
}

impl Layout {
    /// The keys under `prefix` (it should end with `/`).
    pub fn new(prefix: &str) -> Self {
        Layout {
            prefix: prefix.to_string(),
        }
    }

    /// The election key.
    pub fn leader(&self) -> Vec<u8> {
        format!("{}leader", self.prefix).into_bytes()
    }

    /// The prefix of every log key.
    pub fn log_prefix(&self) -> Vec<u8> {
        format!("{}log/", self.prefix).into_bytes()
    }

    /// The key of the piece that starts at `index`.
    pub fn log(&self, index: u64) -> Vec<u8> {
        format!("{}log/{index:020}", self.prefix).into_bytes()
    }

    /// The log index a log key starts at.
    pub fn index_of(&self, key: &[u8]) -> Option<u64> {
        let key = std::str::from_utf8(key).ok()?;
        key.strip_prefix(&self.prefix)?
            .strip_prefix("log/")?
            .parse()
            .ok()
    }

    fn snapshot_latest(&self) -> Vec<u8> {
        format!("{}snapshot/latest", self.prefix).into_bytes()
    }

    fn snapshot_prefix(&self, upto: u64) -> Vec<u8> {
        format!("{}snapshot/{upto:020}/", self.prefix).into_bytes()
    }

    fn snapshot_chunk(&self, upto: u64, chunk: usize) -> Vec<u8> {
        format!("{}snapshot/{upto:020}/{chunk:06}", self.prefix).into_bytes()
    }

    /// Every snapshot chunk key before `upto`'s.
    fn snapshots_before(&self, upto: u64) -> (Vec<u8>, Vec<u8>) {
        (
            format!("{}snapshot/0", self.prefix).into_bytes(),
            format!("{}snapshot/{upto:020}", self.prefix).into_bytes(),
        )
    }
}

/// What `snapshot/latest` holds.
#[derive(Serialize, Deserialize)]
struct SnapshotMeta {
    upto: u64,
    chunks: usize,
    bytes: usize,
}

/// A piece of the log as stored: the term that wrote it and its entries, each in the log's
/// entry encoding.
pub(crate) fn encode_piece(term: i64, entries: &[Vec<u8>]) -> Result<Vec<u8>, BrokerError> {
    let mut bytes = vec![PIECE_FORMAT];
    bytes.extend_from_slice(&term.to_be_bytes());
    postcard::to_io(entries, &mut bytes).map_err(|e| BrokerError::Store(format!("log: {e}")))?;
    Ok(bytes)
}

/// Reads a stored piece that starts at log index `first`: its term and entries.
pub(crate) fn decode_piece(first: u64, bytes: &[u8]) -> Result<(i64, Vec<Entry>), BrokerError> {
    let bad = |why: &dyn std::fmt::Display| {
        BrokerError::Store(format!("etcd log piece at index {first}: {why}"))
    };
    let Some((&PIECE_FORMAT, rest)) = bytes.split_first() else {
        return Err(bad(&"not a log piece of this version"));
    };
    if rest.len() < 8 {
        return Err(bad(&"truncated"));
    }
    let term = i64::from_be_bytes(rest[..8].try_into().expect("8 bytes"));
    let raw: Vec<Vec<u8>> = postcard::from_bytes(&rest[8..]).map_err(|e| bad(&e))?;
    let entries = raw
        .iter()
        .enumerate()
        .map(|(i, e)| decode(first + i as u64, e))
        .collect::<Result<_, _>>()?;
    Ok((term, entries))
}

fn etcd_err(e: EtcdError) -> BrokerError {
    BrokerError::Store(e.to_string())
}

/// The log and snapshots of one group in etcd.
pub struct EtcdStore {
    etcd: Etcd,
    keys: Layout,
    rt: tokio::runtime::Handle,
    /// The term this replica appends under (0: it does not lead).
    term: AtomicI64,
    next: AtomicU64,
    /// The etcd revision recovery read at: the log's tail follows from after it.
    recovered_at: AtomicI64,
}

impl EtcdStore {
    /// A store on `etcd` under `keys`; its blocking calls run on `rt`.
    pub fn new(etcd: Etcd, keys: Layout, rt: tokio::runtime::Handle) -> Self {
        EtcdStore {
            etcd,
            keys,
            rt,
            term: AtomicI64::new(0),
            next: AtomicU64::new(0),
            recovered_at: AtomicI64::new(0),
        }
    }

    /// The revision the last recovery read at.
    pub fn recovered_at(&self) -> i64 {
        self.recovered_at.load(Ordering::Acquire)
    }

    /// Appends one piece under `term` at `first`; an answer lost in transit is resolved by
    /// reading the position back (the piece names the term that wrote it).
    async fn append_piece(&self, term: i64, first: u64, value: Vec<u8>) -> Result<(), BrokerError> {
        let key = self.keys.log(first);
        let leader = self.keys.leader();
        let give_up = tokio::time::Instant::now() + super::LEASE_TTL;
        loop {
            let txn = self
                .etcd
                .txn(
                    vec![created_at(&leader, term), absent(&key)],
                    vec![put(key.clone(), value.clone(), 0)],
                    vec![get(leader.clone())],
                )
                .await;
            match txn {
                Ok(t) if t.succeeded => return Ok(()),
                Ok(t) => {
                    let leader = t
                        .read
                        .into_iter()
                        .next()
                        .map(|kv| String::from_utf8_lossy(&kv.value).into_owned());
                    return Err(BrokerError::NotLeader { leader });
                }
                Err(e) => {
                    warn!(error = %e, index = first, "appending to etcd failed; checking the position");
                    if tokio::time::Instant::now() >= give_up {
                        return Err(BrokerError::NotLeader { leader: None });
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    // The write may have landed before the answer was lost.
                    if let Ok((Some(kv), _)) = self.etcd.get(&key).await {
                        return match decode_piece(first, &kv.value) {
                            Ok((t, _)) if t == term => Ok(()),
                            _ => Err(BrokerError::NotLeader { leader: None }),
                        };
                    }
                }
            }
        }
    }

    /// Every piece from log index `from` on as of `revision` (0: the latest): the entries,
    /// in order, from `from`; `None` when the log no longer reaches back to `from` (a snapshot
    /// dropped it), and the revision read at.
    async fn read_log(
        &self,
        from: u64,
        revision: i64,
    ) -> Result<(Option<Vec<Entry>>, i64), BrokerError> {
        let end = prefix_end(&self.keys.log_prefix());
        let mut start = self.keys.log(0);
        let mut revision = revision;
        let mut entries = Vec::new();
        let mut next = None::<u64>;
        loop {
            let page = self
                .etcd
                .range(&start, &end, revision, PAGE_KEYS)
                .await
                .map_err(etcd_err)?;
            revision = page.revision;
            for kv in &page.kvs {
                let first = self.keys.index_of(&kv.key).ok_or_else(|| {
                    BrokerError::Store(format!(
                        "etcd: {} is not a log key",
                        String::from_utf8_lossy(&kv.key)
                    ))
                })?;
                let (_, piece) = decode_piece(first, &kv.value)?;
                let after = first + piece.len() as u64;
                match next {
                    None if first > from => return Ok((None, revision)),
                    Some(n) if n != first => {
                        return Err(BrokerError::Store(format!(
                            "etcd log has a gap: index {n} is followed by a piece at {first}"
                        )));
                    }
                    _ => {}
                }
                next = Some(after);
                if after > from {
                    let skip = from.saturating_sub(first) as usize;
                    entries.extend(piece.into_iter().skip(skip));
                }
            }
            match page.kvs.last() {
                Some(last) if page.more => {
                    start = last.key.clone();
                    start.push(0);
                }
                _ => break,
            }
        }
        match next {
            // An empty log: fine where the log starts (nothing or a snapshot at `from`).
            None => Ok((Some(entries), revision)),
            Some(n) if n < from => Err(BrokerError::Store(format!(
                "etcd log ends at index {n}, before index {from} this replica has applied"
            ))),
            Some(_) => Ok((Some(entries), revision)),
        }
    }

    async fn recover_at_one_revision(&self) -> Result<(Recovered, u64, i64), BrokerError> {
        let (meta, revision) = self
            .etcd
            .get(&self.keys.snapshot_latest())
            .await
            .map_err(etcd_err)?;
        let mut snapshot = None;
        if let Some(kv) = meta {
            let meta: SnapshotMeta = postcard::from_bytes(&kv.value)
                .map_err(|e| BrokerError::Store(format!("etcd snapshot/latest: {e}")))?;
            let prefix = self.keys.snapshot_prefix(meta.upto);
            let end = prefix_end(&prefix);
            let mut bytes = Vec::with_capacity(meta.bytes);
            let mut start = prefix.clone();
            let mut chunks = 0;
            loop {
                let page = self
                    .etcd
                    .range(&start, &end, revision, 16)
                    .await
                    .map_err(etcd_err)?;
                for kv in &page.kvs {
                    bytes.extend_from_slice(&kv.value);
                    chunks += 1;
                }
                match page.kvs.last() {
                    Some(last) if page.more => {
                        start = last.key.clone();
                        start.push(0);
                    }
                    _ => break,
                }
            }
            if chunks != meta.chunks || bytes.len() != meta.bytes {
                return Err(BrokerError::Store(format!(
                    "etcd snapshot at log index {}: {chunks} chunks of {} bytes, expected {} of {}",
                    meta.upto,
                    bytes.len(),
                    meta.chunks,
                    meta.bytes
                )));
            }
            snapshot = Some((meta.upto, bytes));
        }
        let from = snapshot.as_ref().map_or(0, |(at, _)| *at);
        let (entries, revision) = self.read_log(from, revision).await?;
        let entries = entries.ok_or_else(|| {
            BrokerError::Store(format!(
                "etcd log starts after the snapshot at index {from}"
            ))
        })?;
        let next = from + entries.len() as u64;
        Ok((Recovered { snapshot, entries }, next, revision))
    }
}

impl Store for EtcdStore {
    fn append(&self, entries: &[Entry]) -> Result<(), BrokerError> {
        if entries.is_empty() {
            return Ok(());
        }
        let term = self.term.load(Ordering::Acquire);
        if term == 0 {
            return Err(BrokerError::NotLeader { leader: None });
        }
        let mut next = self.next.load(Ordering::Acquire);
        let mut piece: Vec<Vec<u8>> = Vec::new();
        let mut size = 0;
        let mut pieces = Vec::new();
        for e in entries {
            let bytes = encode(e)?;
            if bytes.len() > MAX_PIECE_BYTES {
                return Err(BrokerError::Store(format!(
                    "a log entry of {} bytes is larger than one etcd request ({MAX_PIECE_BYTES})",
                    bytes.len()
                )));
            }
            if size + bytes.len() > MAX_PIECE_BYTES {
                pieces.push(std::mem::take(&mut piece));
                size = 0;
            }
            size += bytes.len() + 4;
            piece.push(bytes);
        }
        pieces.push(piece);
        let result = self.rt.block_on(async {
            for piece in pieces {
                let count = piece.len() as u64;
                self.append_piece(term, next, encode_piece(term, &piece)?)
                    .await?;
                next += count;
                self.next.store(next, Ordering::Release);
            }
            Ok(())
        });
        if result.is_err() {
            // Deposed, or cut off for longer than the lease: never append under this term
            // again.
            self.term.store(0, Ordering::Release);
        }
        result
    }

    fn next_index(&self) -> u64 {
        self.next.load(Ordering::Acquire)
    }

    /// `upto` is a batch boundary (the writer snapshots between batches), so the pieces
    /// before it hold no entry at or after it.
    fn save_snapshot(&self, upto: u64, snapshot: &[u8]) -> Result<(), BrokerError> {
        let term = self.term.load(Ordering::Acquire);
        if term == 0 {
            return Err(BrokerError::NotLeader { leader: None });
        }
        let leader = self.keys.leader();
        self.rt.block_on(async {
            let chunks: Vec<&[u8]> = snapshot.chunks(CHUNK_BYTES).collect();
            for (i, chunk) in chunks.iter().enumerate() {
                let t = self
                    .etcd
                    .txn(
                        vec![created_at(&leader, term)],
                        vec![put(self.keys.snapshot_chunk(upto, i), chunk.to_vec(), 0)],
                        vec![],
                    )
                    .await
                    .map_err(etcd_err)?;
                if !t.succeeded {
                    return Err(BrokerError::NotLeader { leader: None });
                }
            }
            let meta = postcard::to_stdvec(&SnapshotMeta {
                upto,
                chunks: chunks.len(),
                bytes: snapshot.len(),
            })
            .map_err(|e| BrokerError::Store(e.to_string()))?;
            let (old_from, old_to) = self.keys.snapshots_before(upto);
            let t = self
                .etcd
                .txn(
                    vec![created_at(&leader, term)],
                    vec![
                        put(self.keys.snapshot_latest(), meta, 0),
                        delete_range(self.keys.log(0), self.keys.log(upto)),
                        delete_range(old_from, old_to),
                    ],
                    vec![],
                )
                .await
                .map_err(etcd_err)?;
            if !t.succeeded {
                return Err(BrokerError::NotLeader { leader: None });
            }
            // The deleted log and the replaced snapshots stay in etcd's history until it is
            // compacted; a replica that lags behind this revision starts from the snapshot.
            self.etcd.compact(t.revision).await.map_err(etcd_err)?;
            debug!(upto, revision = t.revision, "etcd compacted");
            Ok(())
        })
    }

    fn recover(&self) -> Result<Recovered, BrokerError> {
        let mut attempts = 0;
        loop {
            match self.rt.block_on(self.recover_at_one_revision()) {
                Ok((recovered, next, revision)) => {
                    self.next.store(next, Ordering::Release);
                    self.recovered_at.store(revision, Ordering::Release);
                    return Ok(recovered);
                }
                // Compacted, or etcd electing a leader: read again, from the new snapshot.
                Err(e) if attempts < 20 => {
                    attempts += 1;
                    warn!(error = %e, attempts, "reading the log from etcd failed; again");
                    std::thread::sleep(std::time::Duration::from_millis(250));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn read_from(&self, index: u64) -> Result<Option<Vec<Entry>>, BrokerError> {
        self.rt.block_on(async {
            let (meta, revision) = self
                .etcd
                .get(&self.keys.snapshot_latest())
                .await
                .map_err(etcd_err)?;
            if let Some(kv) = meta {
                let meta: SnapshotMeta = postcard::from_bytes(&kv.value)
                    .map_err(|e| BrokerError::Store(format!("etcd snapshot/latest: {e}")))?;
                if meta.upto > index {
                    return Ok(None);
                }
            }
            Ok(self.read_log(index, revision).await?.0)
        })
    }

    fn lead(&self, term: i64, next: u64) {
        self.next.store(next, Ordering::Release);
        self.term.store(term, Ordering::Release);
    }

    fn resign(&self) {
        self.term.store(0, Ordering::Release);
    }
}

#[cfg(test)]
#[path = "../../../suanli-cli/tests/support/etcd.rs"]
#[allow(dead_code)] // the fixture serves other tests too
mod etcd_fixture;

#[cfg(test)]
mod tests {
    use super::*;
    use suanli_core::Command;

    /// A store on a real one-member etcd, leading term `term` (the leader key created with
    /// that revision); `None` where etcd is not installed (the fixture says why).
    fn leading_store(
        rt: &tokio::runtime::Runtime,
        cluster: &etcd_fixture::EtcdCluster,
    ) -> (EtcdStore, i64) {
        let endpoints: Vec<String> = cluster.endpoints().split(',').map(String::from).collect();
        // The channels' connections are tasks of the runtime.
        let _in_runtime = rt.enter();
        let etcd = Etcd::connect(&endpoints, std::time::Duration::from_secs(2)).unwrap();
        let keys = Layout::new("/test/");
        let t = rt
            .block_on(etcd.txn(
                vec![created_at(&keys.leader(), 0)],
                vec![put(keys.leader(), b"me".to_vec(), 0)],
                vec![],
            ))
            .unwrap();
        assert!(t.succeeded);
        let store = EtcdStore::new(etcd, keys, rt.handle().clone());
        store.lead(t.revision, 0);
        (store, t.revision)
    }

    fn big_entry(i: u64) -> Entry {
        Entry::Credential {
            principal: crate::auth::Principal::Tenant(format!("t{i}")),
            token: "x".repeat(50_000),
        }
    }

    #[test]
    fn a_batch_larger_than_an_etcd_request_is_split_and_reads_back_whole() {
        let Some(cluster) = etcd_fixture::EtcdCluster::start_or_skip(1) else {
            return;
        };
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (store, _) = leading_store(&rt, &cluster);
        // 100 entries of 50 kB: 5 MB, more than three etcd requests' worth.
        let entries: Vec<Entry> = (0..100).map(big_entry).collect();
        store.append(&entries).unwrap();
        assert_eq!(store.next_index(), 100);
        let pieces = rt
            .block_on(store.etcd.range(
                &store.keys.log_prefix(),
                &prefix_end(&store.keys.log_prefix()),
                0,
                0,
            ))
            .unwrap()
            .kvs;
        assert!(pieces.len() >= 4, "{} pieces", pieces.len());
        assert!(
            pieces
                .iter()
                .all(|kv| kv.value.len() <= MAX_PIECE_BYTES + 64)
        );
        let recovered = store.recover().unwrap();
        assert_eq!(recovered.entries, entries);
        assert_eq!(
            store.read_from(60).unwrap().unwrap(),
            entries[60..].to_vec()
        );
    }

    #[test]
    fn a_deposed_term_appends_nothing_and_a_snapshot_replaces_the_log_before_it() {
        let Some(cluster) = etcd_fixture::EtcdCluster::start_or_skip(1) else {
            return;
        };
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (store, term) = leading_store(&rt, &cluster);
        let tick = |now| Entry::Command {
            now,
            command: Command::Tick,
            key: None,
        };
        store.append(&[tick(0), tick(1)]).unwrap();
        store.append(&[tick(2)]).unwrap();
        // Snapshots are taken between batches, as the writer takes them.
        store.save_snapshot(2, b"state at 2").unwrap();
        store.append(&[tick(3)]).unwrap();
        let r = store.recover().unwrap();
        assert_eq!(r.snapshot, Some((2, b"state at 2".to_vec())));
        assert_eq!(r.entries, vec![tick(2), tick(3)]);
        // A replica that applied only index 1 must start from the snapshot.
        assert_eq!(store.read_from(1).unwrap(), None);
        // Another replica takes the key: this term can no longer append or snapshot.
        let keys = store.keys.clone();
        for op in [
            delete_range(keys.leader(), Vec::new()),
            put(keys.leader(), b"other".to_vec(), 0),
        ] {
            rt.block_on(store.etcd.txn(vec![], vec![op], vec![]))
                .unwrap();
        }
        let Err(BrokerError::NotLeader { leader }) = store.append(&[tick(4)]) else {
            panic!("a deposed term appended");
        };
        assert_eq!(leader.as_deref(), Some("other"));
        assert!(store.save_snapshot(4, b"no").is_err());
        let r = store.recover().unwrap();
        assert_eq!(
            r.entries,
            vec![tick(2), tick(3)],
            "nothing of the old term after it lost"
        );
        assert!(term > 0);
    }

    #[test]
    fn a_piece_round_trips_with_its_term_and_a_damaged_one_is_named() {
        let entries: Vec<Entry> = (0..3)
            .map(|i| Entry::Command {
                now: i,
                command: Command::Tick,
                key: None,
            })
            .collect();
        let raw: Vec<Vec<u8>> = entries.iter().map(|e| encode(e).unwrap()).collect();
        let bytes = encode_piece(42, &raw).unwrap();
        let (term, back) = decode_piece(7, &bytes).unwrap();
        assert_eq!(term, 42);
        assert_eq!(back, entries);
        let e = decode_piece(9, b"\x01abc").unwrap_err().to_string();
        assert!(e.contains("index 9") && e.contains("truncated"), "{e}");
        let e = decode_piece(9, b"\x05").unwrap_err().to_string();
        assert!(e.contains("not a log piece"), "{e}");
    }

    #[test]
    fn log_keys_sort_by_index_and_read_back() {
        let keys = Layout::new("/suanli/");
        assert_eq!(keys.index_of(&keys.log(1234)), Some(1234));
        assert!(keys.log(9) < keys.log(10));
        assert_eq!(keys.index_of(b"/suanli/leader"), None);
        let (from, to) = keys.snapshots_before(5);
        assert!(from.as_slice() < keys.snapshot_chunk(4, 0).as_slice());
        assert!(keys.snapshot_chunk(4, 0).as_slice() < to.as_slice());
        assert!(to.as_slice() <= keys.snapshot_chunk(5, 0).as_slice());
        // The latest marker is never inside a range of chunks.
        assert!(keys.snapshot_latest() > prefix_end(&keys.snapshot_prefix(u64::MAX)));
    }
}
