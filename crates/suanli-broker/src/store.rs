//! The durable command log. Every command that changed the engine is appended, in order, with
//! the time it was applied at; a batch is one transaction and one sync (group commit). On start
//! the broker replays the log into a fresh engine: the engine is deterministic, so the state it
//! recovers is the state it had.
//!
//! The [`Store`] trait is the seam where a replicated log (etcd, say) can take the embedded
//! store's place.

use std::path::Path;

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
    /// A bearer token granted to a principal (it replaces the principal's earlier tokens).
    Credential {
        /// Who it is for.
        principal: Principal,
        /// The token.
        token: String,
    },
}

/// Where the log lives.
pub trait Store: Send {
    /// Appends a batch durably: when this returns, the entries survive a crash.
    fn append(&mut self, entries: &[Entry]) -> Result<(), BrokerError>;
    /// Every entry, in order.
    fn replay(&self) -> Result<Vec<Entry>, BrokerError>;
}

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");

/// The embedded store: a redb database (ACID, copy-on-write B-trees, one file).
pub struct RedbStore {
    db: Database,
    next: u64,
}

fn store_err(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Store(e.to_string())
}

impl RedbStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, BrokerError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| BrokerError::Store(format!("creating {}: {e}", dir.display())))?;
        let path = dir.join("log.redb");
        let db = Database::create(&path)
            .map_err(|e| BrokerError::Store(format!("opening {}: {e}", path.display())))?;
        let txn = db.begin_write().map_err(store_err)?;
        txn.open_table(LOG).map_err(store_err)?;
        txn.commit().map_err(store_err)?;
        let next = {
            let txn = db.begin_read().map_err(store_err)?;
            let table = txn.open_table(LOG).map_err(store_err)?;
            table
                .last()
                .map_err(store_err)?
                .map_or(0, |(k, _)| k.value() + 1)
        };
        Ok(RedbStore { db, next })
    }
}

impl Store for RedbStore {
    fn append(&mut self, entries: &[Entry]) -> Result<(), BrokerError> {
        if entries.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write().map_err(store_err)?;
        {
            let mut table = txn.open_table(LOG).map_err(store_err)?;
            for (i, e) in entries.iter().enumerate() {
                let bytes = serde_json::to_vec(e).map_err(store_err)?;
                table
                    .insert(self.next + i as u64, bytes.as_slice())
                    .map_err(store_err)?;
            }
        }
        txn.commit().map_err(store_err)?;
        self.next += entries.len() as u64;
        Ok(())
    }

    fn replay(&self) -> Result<Vec<Entry>, BrokerError> {
        let txn = self.db.begin_read().map_err(store_err)?;
        let table = txn.open_table(LOG).map_err(store_err)?;
        let mut out = Vec::new();
        for item in table.iter().map_err(store_err)? {
            let (k, v) = item.map_err(store_err)?;
            let entry = serde_json::from_slice(v.value())
                .map_err(|e| BrokerError::Store(format!("log entry {}: {e}", k.value())))?;
            out.push(entry);
        }
        Ok(out)
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
            let mut s = RedbStore::open(dir.path()).unwrap();
            s.append(&entries[..2]).unwrap();
            s.append(&entries[2..]).unwrap();
        }
        let s = RedbStore::open(dir.path()).unwrap();
        assert_eq!(s.replay().unwrap(), entries);
        assert_eq!(s.next, 5);
    }
}
