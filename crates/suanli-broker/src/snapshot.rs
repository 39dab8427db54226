//! Snapshots of the writer's state: the engine, the readable request records, the idempotency
//! keys, the tokens, the clock and the ledger, as of one index of the command log.
//!
//! Taking one must not stall the writer, nor double the broker's memory: at a batch boundary
//! the writer clones the engine, the `Arc`s of the records and the ledger's entries (not the
//! balances derived from them), and encodes the idempotency keys (about 60 bytes a key, where a
//! clone of their table takes about 330); a background thread encodes the rest (postcard, each
//! record in its protobuf wire form, one at a time) and saves it, dropping the log before it
//! in the same transaction. Postcard writes a struct as its fields one after another, so the
//! parts encoded apart make the same bytes as the [`Image`] they are read back as. Recovery
//! then replays only the entries after the snapshot.

use std::collections::VecDeque;
use std::sync::Arc;

use prost::Message;
use serde::{Deserialize, Serialize};
use suanli_billing::{Ledger, LedgerImage};
use suanli_core::{Engine, EngineBeforeIncremental};
use suanli_proto::v1 as pb;

use crate::auth::{Principal, TokenRecord, hash_secret, primary_name};
use crate::error::BrokerError;
use crate::store::Store;
use crate::trail::AuditRecord;
use crate::writer::{Idempotency, IdempotencyByName};

/// The first byte of every saved snapshot. The image is postcard, which is not
/// self-describing: a change to the engine's state changes the format, and a snapshot of
/// another format is refused by name instead of being misread.
pub(crate) const SNAPSHOT_FORMAT: u8 = 10;
/// Snapshots from before incremental passes: the engine is read in its layout of then.
const SNAPSHOT_BEFORE_INCREMENTAL: u8 = 9;
/// Snapshots from before idempotency keys were kept as hashes: read as such, each key hashed.
const SNAPSHOT_BEFORE_HASHED_KEYS: u8 = 8;
/// Snapshots from before tokens were kept as hashes: read as such, each token hashed.
const SNAPSHOT_BEFORE_HASHES: u8 = 7;
/// Snapshots from before idempotency keys recorded what the call asked: read as such.
const SNAPSHOT_BEFORE_ASKED: u8 = 6;

/// What the writer hands to the snapshot thread: its state, cloned at a batch boundary.
pub(crate) struct Capture {
    /// The log index the state is at: every entry before it is in it.
    pub upto: u64,
    pub engine: Engine,
    /// Every readable request (live and retained ended ones).
    pub records: Vec<Arc<pb::Request>>,
    pub ended: VecDeque<(u64, u64)>,
    /// The idempotency keys, encoded as [`Image::idempotency`] is.
    pub idempotency: Vec<u8>,
    pub tokens: Vec<TokenRecord>,
    pub trail: Vec<AuditRecord>,
    pub now: u64,
    /// The ledger's entries (see `billing`), serialised as the ledger is.
    pub ledger: LedgerImage,
    /// The size of the last snapshot, updated with this one's: the buffer is made about that
    /// large at once, rather than doubled as it fills (each doubling holds the old buffer and
    /// the new one together).
    pub last_size: Arc<std::sync::atomic::AtomicUsize>,
}

/// Request records, serialised as [`Image::records`] is: each in its protobuf wire form,
/// encoded one at a time rather than all at once.
struct RecordsWire<'a>(&'a [Arc<pb::Request>]);

impl Serialize for RecordsWire<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(|r| r.encode_to_vec()))
    }
}

/// A snapshot as saved.
#[derive(Serialize, Deserialize)]
pub(crate) struct Image {
    pub engine: Engine,
    /// Request records in protobuf wire form, by id ascending.
    pub records: Vec<Vec<u8>>,
    /// (ended at, request) of the retained ended requests, oldest first.
    pub ended: VecDeque<(u64, u64)>,
    pub idempotency: Idempotency,
    /// Every token, revoked ones included, by name.
    pub tokens: Vec<TokenRecord>,
    /// The audit trail, oldest first.
    pub trail: Vec<AuditRecord>,
    pub now: u64,
    /// The ledger (see `billing`): derived from the log like the engine.
    pub ledger: Ledger,
}

/// A snapshot of format 9: as [`Image`], with the engine's layout of then.
#[derive(Serialize, Deserialize)]
struct ImageBeforeIncremental {
    engine: EngineBeforeIncremental,
    records: Vec<Vec<u8>>,
    ended: VecDeque<(u64, u64)>,
    idempotency: Idempotency,
    tokens: Vec<TokenRecord>,
    trail: Vec<AuditRecord>,
    now: u64,
    ledger: Ledger,
}

impl From<ImageBeforeIncremental> for Image {
    fn from(i: ImageBeforeIncremental) -> Image {
        Image {
            engine: i.engine.into(),
            records: i.records,
            ended: i.ended,
            idempotency: i.idempotency,
            tokens: i.tokens,
            trail: i.trail,
            now: i.now,
            ledger: i.ledger,
        }
    }
}

/// A snapshot of format 8: as format 9, with the idempotency keys in full.
#[derive(Serialize, Deserialize)]
struct ImageBeforeHashedKeys {
    engine: EngineBeforeIncremental,
    records: Vec<Vec<u8>>,
    ended: VecDeque<(u64, u64)>,
    idempotency: IdempotencyByName,
    tokens: Vec<TokenRecord>,
    trail: Vec<AuditRecord>,
    now: u64,
    ledger: Ledger,
}

impl From<ImageBeforeHashedKeys> for Image {
    fn from(i: ImageBeforeHashedKeys) -> Image {
        Image {
            engine: i.engine.into(),
            records: i.records,
            ended: i.ended,
            idempotency: i.idempotency.into(),
            tokens: i.tokens,
            trail: i.trail,
            now: i.now,
            ledger: i.ledger,
        }
    }
}

/// A snapshot of format 7: as [`Image`], with the tokens' secrets in the clear.
#[derive(Serialize, Deserialize)]
struct ImageBeforeHashes {
    engine: EngineBeforeIncremental,
    records: Vec<Vec<u8>>,
    ended: VecDeque<(u64, u64)>,
    idempotency: IdempotencyByName,
    tokens: Vec<(Principal, String)>,
    now: u64,
    ledger: Ledger,
}

/// The start-up tokens of a snapshot from before hashes, as records issued at `now`.
fn hashed(tokens: Vec<(Principal, String)>, now: u64) -> Vec<TokenRecord> {
    tokens
        .into_iter()
        .map(|(principal, secret)| TokenRecord {
            name: primary_name(&principal),
            principal,
            hash: hash_secret(&secret),
            created_ms: now,
            expires_ms: None,
            revoked_ms: None,
        })
        .collect()
}

impl From<ImageBeforeHashes> for Image {
    fn from(i: ImageBeforeHashes) -> Image {
        Image {
            engine: i.engine.into(),
            records: i.records,
            ended: i.ended,
            idempotency: i.idempotency.into(),
            tokens: hashed(i.tokens, i.now),
            trail: Vec::new(),
            now: i.now,
            ledger: i.ledger,
        }
    }
}

/// A snapshot of format 6: as [`Image`], with the idempotency keys of that time.
#[derive(Serialize, Deserialize)]
struct ImageBeforeAsked {
    engine: EngineBeforeIncremental,
    records: Vec<Vec<u8>>,
    ended: VecDeque<(u64, u64)>,
    idempotency: crate::writer::IdempotencyBeforeAsked,
    tokens: Vec<(Principal, String)>,
    now: u64,
    ledger: Ledger,
}

impl From<ImageBeforeAsked> for Image {
    fn from(i: ImageBeforeAsked) -> Image {
        Image {
            engine: i.engine.into(),
            records: i.records,
            ended: i.ended,
            idempotency: i.idempotency.into(),
            tokens: hashed(i.tokens, i.now),
            trail: Vec::new(),
            now: i.now,
            ledger: i.ledger,
        }
    }
}

impl Image {
    /// Reads a saved snapshot; `at` names it in errors.
    pub fn decode(at: u64, bytes: &[u8]) -> Result<Image, BrokerError> {
        let bad =
            |e: postcard::Error| BrokerError::Store(format!("snapshot at log index {at}: {e}"));
        match bytes.split_first() {
            Some((&SNAPSHOT_FORMAT, image)) => postcard::from_bytes(image).map_err(bad),
            Some((&SNAPSHOT_BEFORE_INCREMENTAL, image)) => {
                postcard::from_bytes::<ImageBeforeIncremental>(image)
                    .map(Image::from)
                    .map_err(bad)
            }
            Some((&SNAPSHOT_BEFORE_HASHED_KEYS, image)) => {
                postcard::from_bytes::<ImageBeforeHashedKeys>(image)
                    .map(Image::from)
                    .map_err(bad)
            }
            Some((&SNAPSHOT_BEFORE_HASHES, image)) => {
                postcard::from_bytes::<ImageBeforeHashes>(image)
                    .map(Image::from)
                    .map_err(bad)
            }
            Some((&SNAPSHOT_BEFORE_ASKED, image)) => {
                postcard::from_bytes::<ImageBeforeAsked>(image)
                    .map(Image::from)
                    .map_err(bad)
            }
            Some((other, _)) => Err(BrokerError::Store(format!(
                "snapshot at log index {at} has format {other}; this broker reads formats \
                 {SNAPSHOT_BEFORE_ASKED} to {SNAPSHOT_FORMAT} (start from a data folder of \
                 this version)"
            ))),
            None => Err(BrokerError::Store(format!(
                "snapshot at log index {at} is empty"
            ))),
        }
    }

    /// The request records, decoded.
    pub fn requests(&self) -> Result<Vec<pb::Request>, BrokerError> {
        self.records
            .iter()
            .enumerate()
            .map(|(i, bytes)| {
                pb::Request::decode(bytes.as_slice())
                    .map_err(|e| BrokerError::Store(format!("snapshot record {i}: {e}")))
            })
            .collect()
    }
}

impl Capture {
    /// The snapshot's bytes: [`Image`]'s fields, in its order, each encoded in turn.
    pub(crate) fn encode(self) -> Result<Vec<u8>, BrokerError> {
        let mut records = self.records;
        records.sort_unstable_by_key(|r| r.id);
        let bad = |e: postcard::Error| BrokerError::Store(format!("snapshot: {e}"));
        let last = self.last_size.load(std::sync::atomic::Ordering::Relaxed);
        let mut bytes = Vec::with_capacity(last + last / 8);
        bytes.push(SNAPSHOT_FORMAT);
        postcard::to_io(&self.engine, &mut bytes).map_err(bad)?;
        drop(self.engine);
        postcard::to_io(&RecordsWire(&records), &mut bytes).map_err(bad)?;
        drop(records);
        postcard::to_io(&self.ended, &mut bytes).map_err(bad)?;
        bytes.extend_from_slice(&self.idempotency);
        drop(self.idempotency);
        postcard::to_io(&self.tokens, &mut bytes).map_err(bad)?;
        postcard::to_io(&self.trail, &mut bytes).map_err(bad)?;
        postcard::to_io(&self.now, &mut bytes).map_err(bad)?;
        postcard::to_io(&self.ledger, &mut bytes).map_err(bad)?;
        self.last_size
            .store(bytes.len(), std::sync::atomic::Ordering::Relaxed);
        Ok(bytes)
    }

    /// Encodes and saves the snapshot on a thread of its own.
    pub fn save_in_background(
        self,
        store: Arc<dyn Store>,
    ) -> std::thread::JoinHandle<Result<(), BrokerError>> {
        std::thread::Builder::new()
            .name("suanli-snapshot".into())
            .spawn(move || {
                let upto = self.upto;
                let started = std::time::Instant::now();
                let bytes = self.encode()?;
                store.save_snapshot(upto, &bytes)?;
                tracing::info!(
                    upto,
                    bytes = bytes.len(),
                    ms = started.elapsed().as_millis() as u64,
                    "snapshot saved; the log before it dropped"
                );
                Ok(())
            })
            .expect("spawn the snapshot thread")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_damaged_snapshot_is_an_error_naming_it() {
        let Err(e) = Image::decode(5, b"not a snapshot") else {
            panic!("damaged bytes decoded");
        };
        assert!(e.to_string().contains("snapshot at log index 5"), "{e}");
        let mut damaged = vec![SNAPSHOT_FORMAT];
        damaged.extend_from_slice(b"not a snapshot");
        let Err(e) = Image::decode(6, &damaged) else {
            panic!("damaged bytes decoded");
        };
        assert!(e.to_string().contains("snapshot at log index 6"), "{e}");
    }

    #[test]
    fn a_snapshot_from_before_hashes_is_read_with_its_tokens_hashed() {
        let old = ImageBeforeHashes {
            engine: (&Engine::new(Default::default(), suanli_core::Catalogue::builtin())).into(),
            records: Vec::new(),
            ended: VecDeque::new(),
            idempotency: IdempotencyByName::default(),
            tokens: vec![(Principal::Tenant("acme".into()), "s3cret".into())],
            now: 42,
            ledger: Ledger::new(),
        };
        let mut bytes = vec![SNAPSHOT_BEFORE_HASHES];
        postcard::to_io(&old, &mut bytes).unwrap();
        let image = Image::decode(3, &bytes).unwrap();
        assert_eq!(
            image.tokens,
            [TokenRecord {
                name: "tenant:acme".into(),
                principal: Principal::Tenant("acme".into()),
                hash: hash_secret("s3cret"),
                created_ms: 42,
                expires_ms: None,
                revoked_ms: None,
            }]
        );
    }

    #[test]
    fn a_snapshot_with_idempotency_keys_in_full_is_read() {
        let old = ImageBeforeHashedKeys {
            engine: (&Engine::new(Default::default(), suanli_core::Catalogue::builtin())).into(),
            records: Vec::new(),
            ended: VecDeque::new(),
            idempotency: IdempotencyByName::default(),
            tokens: Vec::new(),
            trail: Vec::new(),
            now: 42,
            ledger: Ledger::new(),
        };
        let mut bytes = vec![SNAPSHOT_BEFORE_HASHED_KEYS];
        postcard::to_io(&old, &mut bytes).unwrap();
        assert_eq!(Image::decode(3, &bytes).unwrap().now, 42);
    }

    #[test]
    fn a_snapshot_from_before_incremental_passes_is_read_with_the_same_engine() {
        use suanli_core::{Command, Fleet, RequestSpec, Shape, TenantSpec};
        let catalogue = suanli_core::Catalogue::builtin();
        let fleet = Fleet::from_toml(suanli_core::fleet::FUTIAN_2024, &catalogue).unwrap();
        let mut engine = Engine::with_fleet(Default::default(), catalogue, &fleet).unwrap();
        engine.apply(
            Command::SetTenant(TenantSpec {
                name: "acme".into(),
                quota_tflops: u64::MAX / 4,
                borrow_limit_tflops: None,
                weight: 1,
            }),
            0,
        );
        for now in 1..=400 {
            let spec = RequestSpec {
                tenant: "acme".into(),
                shape: Shape::Gang {
                    nodes: 16,
                    devices_per_node: 8,
                },
                duration_ms: 3_600_000,
                priority: suanli_core::Priority::Standard,
                constraints: Default::default(),
                policy: None,
                start_after_ms: None,
                deadline_ms: None,
                requeue: false,
                workload: None,
            };
            engine.apply(Command::Submit(spec), now);
            engine.apply(Command::Tick, now);
        }
        assert!(engine.queue_len() > 0, "some wait");
        let old = ImageBeforeIncremental {
            engine: (&engine).into(),
            records: Vec::new(),
            ended: VecDeque::new(),
            idempotency: Idempotency::default(),
            tokens: Vec::new(),
            trail: Vec::new(),
            now: 42,
            ledger: Ledger::new(),
        };
        let mut bytes = vec![SNAPSHOT_BEFORE_INCREMENTAL];
        postcard::to_io(&old, &mut bytes).unwrap();
        let image = Image::decode(3, &bytes).unwrap();
        assert_eq!(image.engine.digest(), engine.digest());
        assert_eq!(image.engine.audit(), Ok(()));
    }

    #[test]
    fn a_snapshot_of_another_format_is_refused_by_name() {
        let Err(e) = Image::decode(7, &[SNAPSHOT_FORMAT + 1, 0, 0]) else {
            panic!("another format decoded");
        };
        let e = e.to_string();
        assert!(
            e.contains(&format!("has format {}", SNAPSHOT_FORMAT + 1)),
            "{e}"
        );
        assert!(e.contains("log index 7"), "{e}");
    }
}
