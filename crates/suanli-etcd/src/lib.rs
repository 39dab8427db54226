//! A small etcd v3 client: the calls a replicated suanli broker makes, no more.
//!
//! etcd speaks gRPC. Its API is declared in `proto/etcd/` with etcd's own package, message
//! names and field numbers, compiled by protox in `build.rs` (no system `protoc`), and the
//! tonic clients generated from it are in [`pb`]. [`Etcd`] wraps them: a channel to each
//! endpoint of the cluster, used one at a time, a deadline on each unary call, and the
//! helpers for key ranges, guarded transactions, leases and watches.
//!
//! Calls go to one member until it fails them (unreachable, no answer within the deadline,
//! or UNAVAILABLE: a member cut off from its cluster's leader), then to the next: a killed
//! member costs one failed call, not one in three as a balancer that keeps trying it would.
//! A failed call is for the caller to retry: etcd elects a new leader within its election
//! timeout, and which calls are safe to repeat is the caller's knowledge, not this crate's.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

/// The generated messages and clients.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    /// Keys and events (`mvccpb`).
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
    /// The KV, Watch and Lease services (`etcdserverpb`).
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
}

use pb::etcdserverpb as rpc;
pub use pb::mvccpb::{Event, KeyValue, event::EventType};
use rpc::kv_client::KvClient;
use rpc::lease_client::LeaseClient;
use rpc::watch_client::WatchClient;

/// etcd's largest request by default (`--max-request-bytes`, 1.5 MiB).
pub const MAX_REQUEST_BYTES: usize = 1536 * 1024;

/// What an etcd call can end with.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// An endpoint is not a URL.
    #[error("etcd endpoint {endpoint:?}: {reason}")]
    Endpoint {
        /// The endpoint as given.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The call failed (etcd answered with an error, or no member could be reached).
    #[error("etcd {call}: {status}")]
    Call {
        /// The call.
        call: &'static str,
        /// etcd's answer.
        status: Box<tonic::Status>,
    },
    /// The call took longer than its deadline.
    #[error("etcd {call}: no answer within {after:?}")]
    Timeout {
        /// The call.
        call: &'static str,
        /// The deadline.
        after: Duration,
    },
    /// The revision asked for has been compacted away.
    #[error("etcd {call}: revision {revision} is compacted")]
    Compacted {
        /// The call.
        call: &'static str,
        /// The revision asked for.
        revision: i64,
    },
    /// A watch or keep-alive stream ended.
    #[error("etcd {0}: the stream ended")]
    StreamEnded(&'static str),
}

impl EtcdError {
    fn call(call: &'static str, status: tonic::Status) -> Self {
        if status
            .message()
            .contains("required revision has been compacted")
        {
            return EtcdError::Compacted { call, revision: 0 };
        }
        EtcdError::Call {
            call,
            status: Box::new(status),
        }
    }
}

/// A client of one etcd cluster. Cheap to clone: clones share the channels and which member
/// is in use.
#[derive(Clone)]
pub struct Etcd {
    members: Arc<Vec<Channel>>,
    /// The member calls go to.
    current: Arc<AtomicUsize>,
    deadline: Duration,
}

/// Snapshot chunks and log pages are large; etcd bounds what it sends.
const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Whether a failed call says its member is unusable (rather than refusing the call).
fn member_failed(status: &tonic::Status) -> bool {
    if matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
    ) {
        return true;
    }
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if e.is::<tonic::transport::Error>() {
            return true;
        }
        source = e.source();
    }
    false
}

/// The end of the range of every key starting with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte was 0xff: the range runs to the end of the key space.
    vec![0]
}

/// A comparison of a key's creation revision, for a guarded transaction.
pub fn created_at(key: &[u8], revision: i64) -> rpc::Compare {
    rpc::Compare {
        result: rpc::compare::CompareResult::Equal as i32,
        target: rpc::compare::CompareTarget::Create as i32,
        key: key.to_vec(),
        target_union: Some(rpc::compare::TargetUnion::CreateRevision(revision)),
        range_end: Vec::new(),
    }
}

/// A comparison that holds while `key` does not exist.
pub fn absent(key: &[u8]) -> rpc::Compare {
    rpc::Compare {
        result: rpc::compare::CompareResult::Equal as i32,
        target: rpc::compare::CompareTarget::Version as i32,
        key: key.to_vec(),
        target_union: Some(rpc::compare::TargetUnion::Version(0)),
        range_end: Vec::new(),
    }
}

/// A put, as an operation of a transaction.
pub fn put(key: Vec<u8>, value: Vec<u8>, lease: i64) -> rpc::RequestOp {
    rpc::RequestOp {
        request: Some(rpc::request_op::Request::RequestPut(rpc::PutRequest {
            key,
            value,
            lease,
            ..Default::default()
        })),
    }
}

/// A delete of the keys in [key, end), as an operation of a transaction.
pub fn delete_range(key: Vec<u8>, end: Vec<u8>) -> rpc::RequestOp {
    rpc::RequestOp {
        request: Some(rpc::request_op::Request::RequestDeleteRange(
            rpc::DeleteRangeRequest {
                key,
                range_end: end,
                prev_kv: false,
            },
        )),
    }
}

/// A read of one key, as an operation of a transaction.
pub fn get(key: Vec<u8>) -> rpc::RequestOp {
    rpc::RequestOp {
        request: Some(rpc::request_op::Request::RequestRange(rpc::RangeRequest {
            key,
            ..Default::default()
        })),
    }
}

/// What a transaction ended with.
#[derive(Debug)]
pub struct TxnOutcome {
    /// Whether every comparison held (and the success branch ran).
    pub succeeded: bool,
    /// The store's revision after the transaction.
    pub revision: i64,
    /// Keys read by the branch that ran, in order.
    pub read: Vec<KeyValue>,
}

/// A page of a range read.
#[derive(Debug)]
pub struct Page {
    /// The keys, ascending.
    pub kvs: Vec<KeyValue>,
    /// More keys follow in the range.
    pub more: bool,
    /// The revision the page was read at.
    pub revision: i64,
}

impl Etcd {
    /// A client balanced over `endpoints` (`http://host:port`); connects lazily, so a member
    /// that is down at start costs nothing until it is used.
    pub fn connect(endpoints: &[String], deadline: Duration) -> Result<Self, EtcdError> {
        let mut list = Vec::new();
        for e in endpoints {
            let url = if e.contains("://") {
                e.clone()
            } else {
                format!("http://{e}")
            };
            let endpoint = Endpoint::from_shared(url)
                .map_err(|err| EtcdError::Endpoint {
                    endpoint: e.clone(),
                    reason: err.to_string(),
                })?
                .connect_timeout(deadline)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(2))
                .keep_alive_timeout(deadline)
                .keep_alive_while_idle(true);
            list.push(endpoint.connect_lazy());
        }
        if list.is_empty() {
            return Err(EtcdError::Endpoint {
                endpoint: String::new(),
                reason: "no endpoints given".into(),
            });
        }
        Ok(Etcd {
            members: Arc::new(list),
            current: Arc::default(),
            deadline,
        })
    }

    /// The member in use and its channel.
    fn member(&self) -> (usize, Channel) {
        let i = self.current.load(Ordering::Acquire) % self.members.len();
        (i, self.members[i].clone())
    }

    /// Member `i` failed a call: the next calls go to the next member (unless another call
    /// moved on already).
    fn failed(&self, i: usize) {
        let next = (i + 1) % self.members.len();
        let _ = self
            .current
            .compare_exchange(i, next, Ordering::AcqRel, Ordering::Acquire);
    }

    fn kv(&self) -> (usize, KvClient<Channel>) {
        let (i, ch) = self.member();
        (
            i,
            KvClient::new(ch)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
    }

    fn lease(&self) -> (usize, LeaseClient<Channel>) {
        let (i, ch) = self.member();
        (i, LeaseClient::new(ch))
    }

    /// Runs a call on member `member` within the deadline; a failure of the member moves
    /// the next calls to another.
    async fn within<T>(
        &self,
        call: &'static str,
        member: usize,
        f: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, EtcdError> {
        match tokio::time::timeout(self.deadline, f).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(status)) => {
                if member_failed(&status) {
                    self.failed(member);
                }
                Err(EtcdError::call(call, status))
            }
            Err(_) => {
                self.failed(member);
                Err(EtcdError::Timeout {
                    call,
                    after: self.deadline,
                })
            }
        }
    }

    /// Reads up to `limit` keys (0: no limit) of [key, end) as of `revision` (0: the latest),
    /// ascending.
    pub async fn range(
        &self,
        key: &[u8],
        end: &[u8],
        revision: i64,
        limit: i64,
    ) -> Result<Page, EtcdError> {
        let req = rpc::RangeRequest {
            key: key.to_vec(),
            range_end: end.to_vec(),
            limit,
            revision,
            sort_order: rpc::range_request::SortOrder::Ascend as i32,
            sort_target: rpc::range_request::SortTarget::Key as i32,
            ..Default::default()
        };
        let (m, mut kv) = self.kv();
        let r = self
            .within("range", m, kv.range(req))
            .await
            .map_err(|e| match e {
                EtcdError::Compacted { call, .. } => EtcdError::Compacted { call, revision },
                e => e,
            })?;
        Ok(Page {
            kvs: r.kvs,
            more: r.more,
            revision: r.header.map_or(0, |h| h.revision),
        })
    }

    /// Reads one key.
    pub async fn get(&self, key: &[u8]) -> Result<(Option<KeyValue>, i64), EtcdError> {
        let (m, mut kv) = self.kv();
        let r = self
            .within(
                "get",
                m,
                kv.range(rpc::RangeRequest {
                    key: key.to_vec(),
                    ..Default::default()
                }),
            )
            .await?;
        Ok((r.kvs.into_iter().next(), r.header.map_or(0, |h| h.revision)))
    }

    /// Runs a transaction: `success` if every comparison holds, `failure` otherwise.
    pub async fn txn(
        &self,
        compare: Vec<rpc::Compare>,
        success: Vec<rpc::RequestOp>,
        failure: Vec<rpc::RequestOp>,
    ) -> Result<TxnOutcome, EtcdError> {
        let (m, mut kv) = self.kv();
        let r = self
            .within(
                "txn",
                m,
                kv.txn(rpc::TxnRequest {
                    compare,
                    success,
                    failure,
                }),
            )
            .await?;
        let read = r
            .responses
            .into_iter()
            .filter_map(|op| match op.response {
                Some(rpc::response_op::Response::ResponseRange(range)) => Some(range.kvs),
                _ => None,
            })
            .flatten()
            .collect();
        Ok(TxnOutcome {
            succeeded: r.succeeded,
            revision: r.header.map_or(0, |h| h.revision),
            read,
        })
    }

    /// Drops the history before `revision` (the keys as of it stay).
    pub async fn compact(&self, revision: i64) -> Result<(), EtcdError> {
        let (m, mut kv) = self.kv();
        match self
            .within(
                "compact",
                m,
                kv.compact(rpc::CompactionRequest {
                    revision,
                    physical: false,
                }),
            )
            .await
        {
            // Compacted already (by another replica, or etcd's own auto-compaction).
            Err(EtcdError::Compacted { .. }) => Ok(()),
            other => other.map(|_| ()),
        }
    }

    /// Grants a lease of `ttl`; returns its id and the TTL etcd granted.
    pub async fn grant(&self, ttl: Duration) -> Result<(i64, i64), EtcdError> {
        let (m, mut lease) = self.lease();
        let r = self
            .within(
                "lease grant",
                m,
                lease.lease_grant(rpc::LeaseGrantRequest {
                    ttl: ttl.as_secs().max(1) as i64,
                    id: 0,
                }),
            )
            .await?;
        Ok((r.id, r.ttl))
    }

    /// Revokes a lease: every key attached to it is deleted at once.
    pub async fn revoke(&self, id: i64) -> Result<(), EtcdError> {
        let (m, mut lease) = self.lease();
        self.within(
            "lease revoke",
            m,
            lease.lease_revoke(rpc::LeaseRevokeRequest { id }),
        )
        .await
        .map(|_| ())
    }

    /// Opens a keep-alive stream for lease `id` and asks for a first renewal: each `()` sent
    /// on the returned sender asks for another, and the stream yields the TTL of each (0 or
    /// less: the lease is gone).
    pub async fn keep_alive(
        &self,
        id: i64,
    ) -> Result<
        (
            tokio::sync::mpsc::Sender<()>,
            impl tokio_stream::Stream<Item = Result<i64, EtcdError>> + use<>,
        ),
        EtcdError,
    > {
        use tokio_stream::StreamExt;
        let (tx, rx) = tokio::sync::mpsc::channel::<()>(4);
        // etcd answers the call once it has a request: the first must be on its way.
        tx.send(())
            .await
            .map_err(|_| EtcdError::StreamEnded("lease keep-alive"))?;
        let requests = ReceiverStream::new(rx).map(move |()| rpc::LeaseKeepAliveRequest { id });
        let (m, mut lease) = self.lease();
        let stream = self
            .within("lease keep-alive", m, lease.lease_keep_alive(requests))
            .await?;
        let etcd = self.clone();
        let ttls = stream.map(move |r| {
            r.map(|r| r.ttl).map_err(|s| {
                if member_failed(&s) {
                    etcd.failed(m);
                }
                EtcdError::call("lease keep-alive", s)
            })
        });
        Ok((tx, ttls))
    }

    /// Watches [key, end) from `revision` on: yields each response's events with the
    /// response's revision. Compaction of `revision` ends the stream with
    /// [`EtcdError::Compacted`].
    pub async fn watch(
        &self,
        key: &[u8],
        end: &[u8],
        revision: i64,
    ) -> Result<
        impl tokio_stream::Stream<Item = Result<(Vec<Event>, i64), EtcdError>> + use<>,
        EtcdError,
    > {
        use tokio_stream::StreamExt;
        let create = rpc::WatchRequest {
            request_union: Some(rpc::watch_request::RequestUnion::CreateRequest(
                rpc::WatchCreateRequest {
                    key: key.to_vec(),
                    range_end: end.to_vec(),
                    start_revision: revision,
                    progress_notify: true,
                    ..Default::default()
                },
            )),
        };
        // The request stream stays open for the life of the watch: etcd ends a watch whose
        // client closed its side.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(create)
            .await
            .map_err(|_| EtcdError::StreamEnded("watch"))?;
        let (m, ch) = self.member();
        let mut client = WatchClient::new(ch).max_decoding_message_size(MAX_MESSAGE_BYTES);
        let stream = self
            .within("watch", m, client.watch(ReceiverStream::new(rx)))
            .await?;
        let etcd = self.clone();
        Ok(stream.map_while(move |r| {
            let _keep_open = &tx;
            match r {
                Err(s) => {
                    if member_failed(&s) {
                        etcd.failed(m);
                    }
                    Some(Err(EtcdError::call("watch", s)))
                }
                Ok(r) if r.canceled => Some(Err(if r.compact_revision > 0 {
                    EtcdError::Compacted {
                        call: "watch",
                        revision,
                    }
                } else {
                    EtcdError::call("watch", tonic::Status::aborted(r.cancel_reason))
                })),
                Ok(r) => Some(Ok((r.events, r.header.map_or(0, |h| h.revision)))),
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_ends_at_the_next_key_after_every_key_it_starts() {
        assert_eq!(prefix_end(b"/suanli/log/"), b"/suanli/log0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }

    #[test]
    fn an_endpoint_that_is_not_a_url_is_named() {
        let Err(e) = Etcd::connect(&["http://bad host:1".into()], Duration::from_secs(1)) else {
            panic!("a bad endpoint was accepted");
        };
        assert!(e.to_string().contains("bad host"), "{e}");
        let Err(e) = Etcd::connect(&[], Duration::from_secs(1)) else {
            panic!("no endpoints were accepted");
        };
        assert!(e.to_string().contains("no endpoints"), "{e}");
    }
}
