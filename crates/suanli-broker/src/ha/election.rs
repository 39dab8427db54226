//! The election: each replica campaigns for the leader key with a lease of its own, keeps
//! the lease alive, and follows the key while another replica holds it.
//!
//! The key is created only if absent, bound to the candidate's lease, with the candidate's
//! advertised address as its value; its creation revision is the term. The winner tells its
//! writer to take over ([`Op::Promote`]) and holds the term until the writer stops leading,
//! or until the lease has not been renewed for a whole TTL ([`Op::Demote`]): a leader cut off
//! from etcd steps down by itself, and the log's guard stops it from appending meanwhile. The
//! others watch the key and campaign again as soon as it is deleted: by the lease's expiry
//! after a crash, at once when the leader resigns.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use suanli_etcd::{Etcd, EventType, created_at, get, put};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tracing::{debug, info, warn};

use super::log::Layout;
use super::{LEASE_TTL, Replica};
use crate::writer::{Handle, Op};

/// Exponential waits between failed etcd calls, from 100 ms up to 2 s.
pub(crate) struct Backoff(Duration);

impl Backoff {
    pub(crate) fn new() -> Self {
        Backoff(Duration::from_millis(100))
    }

    pub(crate) async fn wait(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(Duration::from_secs(2));
    }

    pub(crate) fn reset(&mut self) {
        self.0 = Duration::from_millis(100);
    }
}

/// Campaigns until the broker stops. The lease of the candidacy under way is in
/// [`Replica::lease`], for the server to revoke after the writer's last batch.
pub(crate) async fn campaign(
    etcd: Etcd,
    keys: Layout,
    replica: Arc<Replica>,
    writer: Handle,
    mut stopping: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new();
    while !*stopping.borrow() {
        let (lease, ttl) = match etcd.grant(LEASE_TTL).await {
            Ok(granted) => granted,
            Err(e) => {
                warn!(error = %e, "could not get a lease from etcd");
                backoff.wait().await;
                continue;
            }
        };
        replica.set_lease(lease);
        let ttl = Duration::from_secs(ttl.max(1) as u64);
        let (lost_tx, lost) = watch::channel(false);
        let keeper = tokio::spawn(keep_alive(etcd.clone(), lease, ttl, lost_tx));
        let stopped = candidacy(
            &etcd,
            &keys,
            &replica,
            &writer,
            lease,
            lost,
            &mut stopping,
            &mut backoff,
        )
        .await;
        keeper.abort();
        if stopped {
            return;
        }
        if let Err(e) = etcd.revoke(lease).await {
            debug!(error = %e, "could not revoke an old lease (it expires by itself)");
        }
        replica.set_lease(0);
    }
}

/// One candidacy, on one lease: campaigns, leads if it wins, follows the leader key if not.
/// Ends when the lease is lost or a term this replica led ends; true when the broker stops.
#[allow(clippy::too_many_arguments)]
async fn candidacy(
    etcd: &Etcd,
    keys: &Layout,
    replica: &Arc<Replica>,
    writer: &Handle,
    lease: i64,
    mut lost: watch::Receiver<bool>,
    stopping: &mut watch::Receiver<bool>,
    backoff: &mut Backoff,
) -> bool {
    let key = keys.leader();
    loop {
        if *lost.borrow() {
            return false;
        }
        let attempt = tokio::select! {
            t = etcd.txn(
                vec![created_at(&key, 0)],
                vec![put(key.clone(), replica.advertise().as_bytes().to_vec(), lease)],
                vec![get(key.clone())],
            ) => t,
            _ = stopping.wait_for(|s| *s) => return true,
        };
        let t = match attempt {
            Ok(t) => t,
            Err(e) => {
                warn!(error = %e, "campaigning failed");
                backoff.wait().await;
                continue;
            }
        };
        backoff.reset();
        if t.succeeded {
            let term = t.revision;
            info!(term, advertise = replica.advertise(), "won the election");
            if !writer.deliver(Op::Promote { term }).await {
                return true;
            }
            let mut role = replica.subscribe();
            let lease_lost = tokio::select! {
                _ = role.wait_for(|r| !r.leader && r.term >= term) => false,
                _ = lost.wait_for(|l| *l) => true,
                _ = stopping.wait_for(|s| *s) => return true,
            };
            if lease_lost {
                warn!(
                    term,
                    "the lease was not renewed within its TTL: stepping down"
                );
                if writer.deliver(Op::Demote { term }).await {
                    let _ = role.wait_for(|r| !r.leader && r.term >= term).await;
                }
            }
            return false;
        }
        // Another replica leads: follow its key until it goes.
        let holder = t.read.into_iter().next();
        replica.leader_is(
            holder
                .as_ref()
                .map(|kv| String::from_utf8_lossy(&kv.value).into_owned()),
        );
        if holder.is_none() {
            continue; // gone already
        }
        let watch = match etcd.watch(&key, &[], t.revision + 1).await {
            Ok(w) => w,
            Err(e) => {
                warn!(error = %e, "could not watch the leader key");
                backoff.wait().await;
                continue;
            }
        };
        tokio::pin!(watch);
        loop {
            tokio::select! {
                event = watch.next() => match event {
                    Some(Ok((events, _))) => {
                        if events.iter().any(|e| e.r#type == EventType::Delete as i32) {
                            replica.leader_is(None);
                            break;
                        }
                        if let Some(kv) = events.last().and_then(|e| e.kv.as_ref()) {
                            replica.leader_is(Some(String::from_utf8_lossy(&kv.value).into_owned()));
                        }
                    }
                    // The stream broke (an etcd member went away): look again.
                    _ => break,
                },
                _ = lost.wait_for(|l| *l) => return false,
                _ = stopping.wait_for(|s| *s) => return true,
            }
        }
    }
}

/// Renews `lease` every third of its TTL; says `lost` once no renewal was acknowledged for a
/// whole TTL, counted from when the acknowledged request was sent (etcd renews on receipt, so
/// this errs on the early side), or when etcd says the lease is gone.
async fn keep_alive(etcd: Etcd, lease: i64, ttl: Duration, lost: watch::Sender<bool>) {
    let mut renewed = Instant::now();
    loop {
        if renewed.elapsed() >= ttl {
            let _ = lost.send(true);
            return;
        }
        let asked = Instant::now();
        let (tx, stream) = match etcd.keep_alive(lease).await {
            Ok(s) => s,
            Err(e) => {
                debug!(error = %e, "keep-alive stream failed; opening another");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        tokio::pin!(stream);
        let mut tick = tokio::time::interval_at(asked + ttl / 3, ttl / 3);
        let mut sent = VecDeque::from([asked]);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if renewed.elapsed() >= ttl {
                        let _ = lost.send(true);
                        return;
                    }
                    if tx.send(()).await.is_err() {
                        break;
                    }
                    sent.push_back(Instant::now());
                }
                answer = stream.next() => match answer {
                    Some(Ok(left)) if left > 0 => {
                        if let Some(at) = sent.pop_front() {
                            renewed = at;
                        }
                    }
                    Some(Ok(_)) => {
                        warn!(lease, "etcd says the lease is gone");
                        let _ = lost.send(true);
                        return;
                    }
                    _ => break,
                },
            }
        }
    }
}
