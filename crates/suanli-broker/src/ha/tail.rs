//! The log's tail: a follower watches the log in etcd from where its recovery read it and
//! hands every piece to its writer, which applies the entries it lacks. The writer drops what
//! it has (pieces are numbered by log index), so the tail may deliver a piece twice but never
//! skips one: when etcd has compacted the history past the tail's place, the writer starts
//! again from the latest snapshot ([`Op::Resync`]) and the tail goes on from now.

use std::sync::Arc;

use suanli_etcd::{Etcd, EtcdError, EventType, prefix_end};
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tracing::{error, warn};

use super::Replica;
use super::election::Backoff;
use super::log::{Layout, decode_piece};
use crate::writer::{Handle, Op};

/// Follows the log from etcd revision `after` on until the broker stops.
pub(crate) async fn follow_log(
    etcd: Etcd,
    keys: Layout,
    replica: Arc<Replica>,
    writer: Handle,
    after: i64,
    mut stopping: watch::Receiver<bool>,
) {
    let prefix = keys.log_prefix();
    let end = prefix_end(&prefix);
    let mut next = after + 1;
    let mut backoff = Backoff::new();
    loop {
        let opened = tokio::select! {
            s = etcd.watch(&prefix, &end, next) => s,
            _ = stopping.wait_for(|s| *s) => return,
        };
        let stream = match opened {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "could not watch the log");
                backoff.wait().await;
                continue;
            }
        };
        tokio::pin!(stream);
        loop {
            let item = tokio::select! {
                i = stream.next() => i,
                _ = stopping.wait_for(|s| *s) => return,
            };
            match item {
                Some(Ok((events, _))) => {
                    backoff.reset();
                    for event in events {
                        let Some(kv) = event.kv else { continue };
                        next = next.max(kv.mod_revision + 1);
                        // Deletes are a snapshot dropping the log before it. The leader's
                        // own appends need no applying.
                        if event.r#type != EventType::Put as i32 || replica.is_leader() {
                            continue;
                        }
                        let Some(first) = keys.index_of(&kv.key) else {
                            continue;
                        };
                        match decode_piece(first, &kv.value) {
                            Ok((_, entries)) => {
                                if !writer.deliver(Op::Replicated { first, entries }).await {
                                    return;
                                }
                            }
                            // The writer sees the gap and reads the state again.
                            Err(e) => error!(error = %e, "a piece of the log cannot be read"),
                        }
                    }
                }
                Some(Err(EtcdError::Compacted { .. })) => {
                    warn!(
                        "the log was compacted past this replica's place: starting again from \
                         the latest snapshot"
                    );
                    // From now: the writer's fresh read is at least as recent.
                    match etcd.get(&keys.leader()).await {
                        Ok((_, revision)) => next = revision + 1,
                        Err(_) => {
                            backoff.wait().await;
                            break;
                        }
                    }
                    if !writer.deliver(Op::Resync).await {
                        return;
                    }
                    break;
                }
                Some(Err(e)) => {
                    warn!(error = %e, "the log's watch failed; watching again");
                    backoff.wait().await;
                    break;
                }
                None => break,
            }
        }
    }
}
