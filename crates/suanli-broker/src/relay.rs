//! The broker's side of the agents' streams that is not a decision: which agent is connected
//! for which pool now, and the relay of jobs' output from an agent to the tenant who asked.
//!
//! Output never passes through the writer or the command log: a `StreamLogs` call takes an id,
//! sends a `LogsRequest` down the pool's agent stream, and the agent's `LogsData` answers are
//! forwarded to the caller in bounded chunks. A caller that cannot keep up, or an agent that
//! disconnects, ends the relay with an error rather than buffering without bound; a caller
//! that goes away makes the broker tell the agent to stop sending.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use suanli_proto::v1 as pb;
use tokio::sync::mpsc;
use tonic::Status;

/// Chunks buffered for one caller before the relay gives up on it (64 KiB each at most).
const RELAY_BUFFER: usize = 64;

/// A connected agent.
struct Link {
    /// Distinguishes this connection from a later one for the same pool.
    generation: u64,
    tx: mpsc::Sender<pb::BrokerMessage>,
}

/// One caller waiting for output.
struct Relay {
    pool: String,
    tx: mpsc::Sender<Result<pb::LogChunk, Status>>,
}

/// Connected agents and open output relays.
#[derive(Default)]
pub(crate) struct Agents {
    links: DashMap<String, Link>,
    relays: DashMap<u64, Relay>,
    next: AtomicU64,
}

impl Agents {
    /// Records a new connection for `pool`, replacing any earlier one; returns its generation.
    pub fn connected(&self, pool: &str, tx: mpsc::Sender<pb::BrokerMessage>) -> u64 {
        let generation = self.next.fetch_add(1, Ordering::Relaxed);
        self.links.insert(pool.to_string(), Link { generation, tx });
        generation
    }

    /// Forgets a connection (unless a newer one replaced it) and ends the relays through it.
    pub fn disconnected(&self, pool: &str, generation: u64) {
        let removed = self
            .links
            .remove_if(pool, |_, link| link.generation == generation)
            .is_some();
        if removed {
            self.relays.retain(|_, relay| {
                if relay.pool != pool {
                    return true;
                }
                let _ = relay.tx.try_send(Err(Status::unavailable(format!(
                    "the agent of pool {pool} disconnected; ask again when it is back"
                ))));
                false
            });
        }
    }

    /// Sends a message to a pool's agent now, if one is connected and keeping up.
    pub fn tell(&self, pool: &str, msg: pb::BrokerMessage) -> bool {
        self.links
            .get(pool)
            .is_some_and(|link| link.tx.try_send(msg).is_ok())
    }

    /// Opens a relay: asks the pool's agent for output and returns the stream of chunks. The
    /// relay ends when the agent says it is done, when the stream is dropped, or when the agent
    /// goes away.
    pub fn open_logs(
        self: &Arc<Self>,
        pool: &str,
        mut ask: pb::LogsRequest,
    ) -> Result<LogStream, Status> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        ask.id = id;
        let (tx, rx) = mpsc::channel(RELAY_BUFFER);
        self.relays.insert(
            id,
            Relay {
                pool: pool.to_string(),
                tx,
            },
        );
        let msg = pb::BrokerMessage {
            body: Some(pb::broker_message::Body::LogsRequest(ask)),
        };
        if !self.tell(pool, msg) {
            self.relays.remove(&id);
            return Err(Status::unavailable(format!(
                "the agent of pool {pool} is not connected (or not keeping up); its jobs' output \
                 stays on the pool: try again when it is back"
            )));
        }
        Ok(LogStream {
            rx,
            id,
            pool: pool.to_string(),
            agents: Arc::clone(self),
        })
    }

    /// An agent's answer to a relay: forwarded, or the relay ends when its caller cannot take
    /// it.
    pub fn data(&self, pool: &str, data: pb::LogsData) {
        let Some(relay) = self.relays.get(&data.id) else {
            // The caller went away; the LogsCancel may still be on its way.
            return;
        };
        if relay.pool != pool {
            tracing::warn!(
                pool,
                id = data.id,
                "output for a relay of another pool: ignored"
            );
            return;
        }
        let mut overrun = false;
        if !data.data.is_empty() {
            let chunk = pb::LogChunk {
                stream: data.stream,
                data: data.data,
            };
            if relay.tx.try_send(Ok(chunk)).is_err() {
                let _ = relay.tx.try_send(Err(Status::resource_exhausted(
                    "the output came faster than it was read; ask again with tail_lines",
                )));
                overrun = true;
            }
        }
        if data.done && !data.error.is_empty() {
            let _ = relay.tx.try_send(Err(Status::not_found(data.error)));
        }
        drop(relay);
        if data.done {
            // The agent has finished with it: nothing to cancel.
            self.relays.remove(&data.id);
        } else if overrun {
            self.end(pool, data.id);
        }
    }

    fn end(&self, pool: &str, id: u64) {
        if self.relays.remove(&id).is_some() {
            self.tell(
                pool,
                pb::BrokerMessage {
                    body: Some(pb::broker_message::Body::LogsCancel(pb::LogsCancel { id })),
                },
            );
        }
    }
}

/// The caller's end of a relay. Dropping it tells the agent to stop sending.
pub(crate) struct LogStream {
    rx: mpsc::Receiver<Result<pb::LogChunk, Status>>,
    id: u64,
    pool: String,
    agents: Arc<Agents>,
}

impl tokio_stream::Stream for LogStream {
    type Item = Result<pb::LogChunk, Status>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for LogStream {
    fn drop(&mut self) {
        self.agents.end(&self.pool, self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;

    fn logs_request(msg: pb::BrokerMessage) -> pb::LogsRequest {
        match msg.body {
            Some(pb::broker_message::Body::LogsRequest(r)) => r,
            other => panic!("not a LogsRequest: {other:?}"),
        }
    }

    #[tokio::test]
    async fn output_is_relayed_until_done_and_a_dropped_caller_cancels() {
        let agents = Arc::new(Agents::default());
        let (tx, mut agent) = mpsc::channel(16);
        let generation = agents.connected("p", tx);
        assert!(agents.open_logs("q", pb::LogsRequest::default()).is_err());
        let mut stream = agents
            .open_logs(
                "p",
                pb::LogsRequest {
                    request: 7,
                    ..Default::default()
                },
            )
            .unwrap();
        let ask = logs_request(agent.recv().await.unwrap());
        assert_eq!(ask.request, 7);
        let data = |bytes: &[u8], done| pb::LogsData {
            id: ask.id,
            stream: pb::LogStream::Stdout as i32,
            data: bytes.to_vec(),
            done,
            error: String::new(),
        };
        agents.data("other", data(b"not yours", false));
        agents.data("p", data(b"hello ", false));
        agents.data("p", data(b"world", true));
        let mut got = Vec::new();
        while let Some(chunk) = stream.next().await {
            got.extend(chunk.unwrap().data);
        }
        assert_eq!(got, b"hello world");
        // A caller that goes away cancels its relay at the agent.
        let stream = agents.open_logs("p", pb::LogsRequest::default()).unwrap();
        let ask = logs_request(agent.recv().await.unwrap());
        drop(stream);
        match agent.recv().await.unwrap().body {
            Some(pb::broker_message::Body::LogsCancel(c)) => assert_eq!(c.id, ask.id),
            other => panic!("not a LogsCancel: {other:?}"),
        }
        // An agent that goes away ends its relays with UNAVAILABLE.
        let mut stream = agents.open_logs("p", pb::LogsRequest::default()).unwrap();
        agents.disconnected("p", generation + 100);
        assert!(
            agents.links.contains_key("p"),
            "a stale generation changes nothing"
        );
        agents.disconnected("p", generation);
        let err = stream.next().await.unwrap().unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
    }
}
