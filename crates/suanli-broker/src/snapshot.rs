//! Snapshots of the writer's state: the engine, the readable request records, the idempotency
//! keys, the tokens and the clock, as of one index of the command log.
//!
//! Taking one must not stall the writer: the writer only clones what it owns (the engine, the
//! keys) and the `Arc`s of the records, in one batch boundary; a background thread encodes the
//! copy (postcard, with each record in its protobuf wire form) and saves it, dropping the log
//! before it in the same transaction. Recovery then replays only the entries after the snapshot.

use std::collections::VecDeque;
use std::sync::Arc;

use prost::Message;
use serde::{Deserialize, Serialize};
use suanli_core::Engine;
use suanli_proto::v1 as pb;

use crate::auth::Principal;
use crate::error::BrokerError;
use crate::store::Store;
use crate::writer::Idempotency;

/// What the writer hands to the snapshot thread: its state, cloned at a batch boundary.
pub(crate) struct Capture {
    /// The log index the state is at: every entry before it is in it.
    pub upto: u64,
    pub engine: Engine,
    /// Every readable request (live and retained ended ones).
    pub records: Vec<Arc<pb::Request>>,
    pub ended: VecDeque<(u64, u64)>,
    pub idempotency: Idempotency,
    pub tokens: Vec<(Principal, String)>,
    pub now: u64,
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
    pub tokens: Vec<(Principal, String)>,
    pub now: u64,
}

impl Image {
    /// Reads a saved snapshot; `at` names it in errors.
    pub fn decode(at: u64, bytes: &[u8]) -> Result<Image, BrokerError> {
        postcard::from_bytes(bytes)
            .map_err(|e| BrokerError::Store(format!("snapshot at log index {at}: {e}")))
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
    fn encode(self) -> Result<Vec<u8>, BrokerError> {
        let mut records = self.records;
        records.sort_unstable_by_key(|r| r.id);
        let image = Image {
            engine: self.engine,
            records: records.iter().map(|r| r.encode_to_vec()).collect(),
            ended: self.ended,
            idempotency: self.idempotency,
            tokens: self.tokens,
            now: self.now,
        };
        postcard::to_stdvec(&image).map_err(|e| BrokerError::Store(format!("snapshot: {e}")))
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
    }
}
