//! The gRPC services. Each checks who calls, converts and validates the message (see
//! `convert`), sends commands to the writer and answers from the read views.

pub mod operator;
pub mod pool;
pub mod tenant;

use std::sync::Arc;

use tokio::sync::{broadcast, watch};

use crate::auth::{Credential, Tokens};
use crate::error::BrokerError;
use crate::store::IdemKey;
use crate::views::Views;
use crate::writer::{Handle, WatchEvent};

/// What every service shares.
#[derive(Clone)]
pub struct Shared {
    pub(crate) writer: Handle,
    pub(crate) views: Arc<Views>,
    pub(crate) watch: broadcast::Sender<Arc<WatchEvent>>,
    /// Turns true when the server stops: open streams end so the stop can finish.
    pub(crate) stopping: watch::Receiver<bool>,
    /// Connected agents and the relays of jobs' output.
    pub(crate) agents: Arc<crate::relay::Agents>,
    /// The writer's counters, which the agents' streams add to.
    pub(crate) metrics: Arc<crate::metrics::WriterMetrics>,
    /// The replica's role: streams are served by the leader.
    pub(crate) replica: Arc<crate::ha::Replica>,
    /// The tokens: streams end when theirs stops working.
    pub(crate) tokens: Tokens,
    /// The audit trail.
    pub(crate) trail: crate::trail::Trail,
    /// Per-tenant rates in front of the writer.
    pub(crate) admission: Arc<crate::admission::Admission>,
}

impl Shared {
    /// A tenant's statement for `month` (the wire form; empty: this month), read from the
    /// ledger once its batch is durable.
    pub async fn statement(
        &self,
        tenant: String,
        month: &str,
    ) -> Result<suanli_proto::v1::Statement, tonic::Status> {
        let month = crate::convert::month_from_pb(month, "month", crate::writer::wall_ms())?;
        let statement = self
            .writer
            .read_ledger(move |l| l.tenant_statement(&tenant, month))
            .await?
            .map_err(crate::billing::billing_error)?;
        Ok(crate::convert::statement_to_pb(&statement))
    }

    /// A pool as the views show it.
    pub fn pool(&self, id: &str) -> Result<suanli_proto::v1::Pool, BrokerError> {
        self.views
            .snapshot()
            .pools
            .iter()
            .find(|p| p.id == id)
            .cloned()
            .ok_or_else(|| BrokerError::NotFound(format!("pool {id} not found")))
    }

    /// A response stream that ends when the server stops (or the client goes away), so that a
    /// graceful stop does not wait forever on watchers and agents, and when the token it was
    /// opened with stops working (revoked, expired), with UNAUTHENTICATED saying so.
    pub fn until_closed<S, T>(
        &self,
        credential: &Credential,
        stream: S,
    ) -> tokio_stream::wrappers::ReceiverStream<Result<T, tonic::Status>>
    where
        S: tokio_stream::Stream<Item = Result<T, tonic::Status>> + Send + 'static,
        T: Send + 'static,
    {
        use tokio_stream::StreamExt;
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let stopped = self.stopped();
        let closed = self.tokens.closed(credential);
        tokio::spawn(async move {
            tokio::pin!(stream);
            tokio::pin!(stopped);
            tokio::pin!(closed);
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = tx.closed() => break,
                    why = &mut closed => {
                        let _ = tx.send(Err(tonic::Status::unauthenticated(why))).await;
                        break;
                    }
                    item = stream.next() => match item {
                        Some(item) => {
                            if tx.send(item).await.is_err() {
                                break;
                            }
                        }
                        None => break,
                    },
                }
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }

    /// Completes when the server stops, or when this replica stops leading: a stream of the
    /// leader's (a watch, an agent's link) ends then, and its client finds the new leader.
    pub fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.stopping.clone();
        let mut role = self.replica.subscribe();
        let leading = role.borrow().leader;
        async move {
            tokio::select! {
                _ = rx.wait_for(|s| *s) => {}
                _ = role.wait_for(|r| leading && !r.leader) => {}
            }
        }
    }
}

/// Default and largest page sizes of list calls.
pub const DEFAULT_PAGE: usize = 100;
/// Largest page size.
pub const MAX_PAGE: usize = 1000;

/// The page size a caller asked for, bounded.
pub fn page_size(asked: u32) -> usize {
    match asked as usize {
        0 => DEFAULT_PAGE,
        n => n.min(MAX_PAGE),
    }
}

/// The offset or id a page token carries.
pub fn page_from(token: &str) -> Result<u64, BrokerError> {
    if token.is_empty() {
        return Ok(0);
    }
    token
        .parse()
        .map_err(|_| BrokerError::field("page_token", "not a token this server issued"))
}

/// The idempotency key of a mutating call `rpc` (none when the caller sent no request_id),
/// with what the call asked: a retry repeats its call, a reuse of the request_id for another
/// call (another method, another message) is refused.
pub fn idem_key(
    caller: String,
    request_id: &str,
    rpc: &str,
    message: &impl prost::Message,
) -> Result<Option<IdemKey>, BrokerError> {
    if request_id.len() > 128 {
        return Err(BrokerError::field("request_id", "longer than 128 bytes"));
    }
    Ok((!request_id.is_empty()).then(|| IdemKey {
        caller,
        request_id: request_id.to_string(),
        asked: asked(rpc, &message.encode_to_vec()),
    }))
}

/// A hash of a call: FNV-1a of its method and its message's protobuf form (which carries the
/// request_id, the same in both calls compared). It is logged and compared after restarts
/// and upgrades, so it is this fixed function rather than the standard library's hasher. Never
/// 0, which stands for a key logged before calls were hashed.
fn asked(rpc: &str, message: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in rpc.as_bytes().iter().chain(&[0]).chain(message) {
        hash ^= byte as u64;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash.max(1)
}
