//! Following the leader of a group of brokers.
//!
//! A group is several replicas; one leads. A follower answers a mutation (and a stream) with
//! UNAVAILABLE and, when it knows the leader, the leader's `host:port` in the
//! [`LEADER_METADATA`] key. [`LeaderChannel`] holds the addresses a client was given,
//! remembers which one leads, and sends each call there: on a redirect it goes to the named
//! leader at once; on a broker it cannot reach (or that went away during the call, or that
//! did not answer within the attempt's time: a paused broker answers nothing), or UNAVAILABLE
//! without a leader (an election under way), it tries the next address after a wait that
//! doubles from 50 ms to 250 ms, for at most its patience (30 s by default) in all. Every other
//! answer is the call's own. Generated clients take it in place of a channel, so every call
//! of every client follows the leader.
//!
//! A RESOURCE_EXHAUSTED that carries `grpc-retry-pushback-ms` (a tenant over its rate) is
//! tried again after that long (twice as long as the last wait if refused again, up to 2 s),
//! within the same patience.
//!
//! A retried mutation is safe when it carries a `request_id`: the broker answers a repeated
//! id with the first answer, and a follower never applied it.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::Status;
use tonic::transport::{Channel, Endpoint};

/// The longest wait between two tries while no broker leads: a group elects its next leader
/// within its lease, and a client should see it soon after.
const MAX_WAIT: Duration = Duration::from_millis(250);

/// The longest a call waits before trying again after being told to slow down.
const MAX_PUSHBACK: Duration = Duration::from_secs(2);

/// The metadata key of the leader's address on a follower's UNAVAILABLE.
pub const LEADER_METADATA: &str = "suanli-leader";

/// Splits a comma-separated list of broker addresses, adding `http://` where no scheme is
/// given.
pub fn parse_addresses(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(with_scheme)
        .collect()
}

/// `host:port` as `http://host:port`; an address with a scheme as it is.
pub fn with_scheme(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

/// How a client builds the endpoint of an address (plain, or TLS with its roots).
pub type EndpointOf = Box<dyn Fn(&str) -> Result<Endpoint, Status> + Send + Sync>;

/// Calls whose request is a stream of the client's: sent as they are, to the broker believed
/// to lead, and not retried (the caller reconnects; the redirect it got is remembered).
const CLIENT_STREAMS: &[&str] = &["/suanli.v1.PoolService/ConnectAgent"];

/// A channel to whichever broker of a group leads: generated clients take it in place of a
/// [`Channel`]. See the module documentation.
#[derive(Clone)]
pub struct LeaderChannel {
    state: Arc<State>,
}

struct State {
    addrs: Mutex<Vec<String>>,
    /// Index in `addrs` of the broker believed to lead, and the channel to it.
    current: Mutex<(usize, Option<Channel>)>,
    endpoint: EndpointOf,
    patience: Duration,
    attempt: Duration,
}

impl LeaderChannel {
    /// The brokers at `addrs` (URLs), reached through endpoints `endpoint` builds.
    pub fn new(addrs: Vec<String>, endpoint: EndpointOf) -> Self {
        Self::with_timing(
            addrs,
            endpoint,
            Duration::from_secs(30),
            Duration::from_secs(5),
        )
    }

    /// As [`LeaderChannel::new`], looking for the leader for at most `patience` per call, and
    /// abandoning an attempt after `attempt` (a paused broker answers nothing at all).
    pub fn with_timing(
        addrs: Vec<String>,
        endpoint: EndpointOf,
        patience: Duration,
        attempt: Duration,
    ) -> Self {
        assert!(!addrs.is_empty(), "a group has at least one address");
        LeaderChannel {
            state: Arc::new(State {
                addrs: Mutex::new(addrs),
                current: Mutex::new((0, None)),
                endpoint,
                patience,
                attempt,
            }),
        }
    }

    /// How many addresses the group has (as given, and as learned from redirects).
    pub fn len(&self) -> usize {
        self.state.addrs.lock().expect("addresses").len()
    }

    /// Whether the group has no address (never: a group has at least one).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The addresses, the broker believed to lead first, then the others in order.
    pub fn addresses(&self) -> Vec<String> {
        let i = self.state.current.lock().expect("leader").0;
        let addrs = self.state.addrs.lock().expect("addresses");
        addrs[i..].iter().chain(&addrs[..i]).cloned().collect()
    }

    /// Takes `channel`, connected to `addr`, as the channel to the broker believed to lead.
    pub fn adopt(&self, addr: &str, channel: Channel) {
        self.go_to(addr);
        self.state.current.lock().expect("leader").1 = Some(channel);
    }

    /// The address of the broker believed to lead.
    pub fn current(&self) -> String {
        let i = self.state.current.lock().expect("leader").0;
        self.state.addrs.lock().expect("addresses")[i].clone()
    }

    /// A channel to the broker believed to lead, connecting if needed; one that cannot be
    /// reached makes the next address current.
    async fn channel(&self) -> Result<(usize, Channel), Status> {
        let (i, addr) = {
            let current = self.state.current.lock().expect("leader");
            if let Some(c) = &current.1 {
                return Ok((current.0, c.clone()));
            }
            (
                current.0,
                self.state.addrs.lock().expect("addresses")[current.0].clone(),
            )
        };
        let endpoint = (self.state.endpoint)(&addr)?;
        let channel = endpoint.connect().await.map_err(|e| {
            self.next(i);
            Status::unavailable(format!("cannot connect to the broker at {addr}: {e}"))
        })?;
        let mut current = self.state.current.lock().expect("leader");
        if current.0 == i {
            current.1 = Some(channel.clone());
        }
        Ok((i, channel))
    }

    /// Goes to `addr` (`host:port` or a URL) next, adding it to the list if it is new.
    fn go_to(&self, addr: &str) {
        let url = with_scheme(addr);
        let index = {
            let mut addrs = self.state.addrs.lock().expect("addresses");
            match addrs.iter().position(|a| *a == url) {
                Some(i) => i,
                None => {
                    addrs.push(url);
                    addrs.len() - 1
                }
            }
        };
        let mut current = self.state.current.lock().expect("leader");
        if current.0 != index {
            *current = (index, None);
        }
    }

    /// Broker `from` failed: the next calls go to the next address (unless another call
    /// moved on already).
    fn next(&self, from: usize) {
        let n = self.state.addrs.lock().expect("addresses").len();
        let mut current = self.state.current.lock().expect("leader");
        if current.0 == from {
            *current = ((from + 1) % n, None);
        }
    }

    /// Sends one attempt of a call.
    async fn send(
        &self,
        request: http::Request<tonic::body::Body>,
    ) -> Result<(usize, http::Response<tonic::body::Body>), Status> {
        let (i, mut channel) = self.channel().await?;
        let call = async {
            std::future::poll_fn(|cx| tower_service::Service::poll_ready(&mut channel, cx)).await?;
            tower_service::Service::call(&mut channel, request).await
        };
        match tokio::time::timeout(self.state.attempt, call).await {
            Ok(Ok(response)) => Ok((i, response)),
            Ok(Err(e)) => {
                self.next(i);
                Err(Status::unavailable(format!("the broker went away: {e}")))
            }
            Err(_) => {
                self.next(i);
                Err(Status::unavailable(format!(
                    "the broker did not answer within {:?}",
                    self.state.attempt
                )))
            }
        }
    }

    /// Sends a call, following the leader (see the module documentation).
    async fn follow(
        self,
        request: http::Request<tonic::body::Body>,
    ) -> Result<http::Response<tonic::body::Body>, Status> {
        use http_body_util::BodyExt as _;
        if CLIENT_STREAMS.contains(&request.uri().path()) {
            let (i, response) = self.send(request).await?;
            self.learn(i, &response);
            return Ok(response);
        }
        let (parts, body) = request.into_parts();
        let bytes = body
            .collect()
            .await
            .map_err(|e| Status::internal(format!("reading the request: {e}")))?
            .to_bytes();
        let give_up = std::time::Instant::now() + self.state.patience;
        let mut wait = Duration::from_millis(50);
        let mut held_back = Duration::ZERO;
        loop {
            let mut attempt = http::Request::new(tonic::body::Body::new(
                http_body_util::Full::new(bytes.clone()),
            ));
            *attempt.method_mut() = parts.method.clone();
            *attempt.uri_mut() = parts.uri.clone();
            *attempt.version_mut() = parts.version;
            *attempt.headers_mut() = parts.headers.clone();
            let redirect = match self.send(attempt).await {
                Ok((_, response)) if pushback(&response).is_some() => {
                    // The broker asks this caller to slow down: wait as long as it says, and
                    // twice as long as last time if it asks again, so that many calls held
                    // back together do not all come back at once (unless that is past the
                    // patience).
                    let hint = pushback(&response).unwrap_or_default();
                    held_back = hint.max(held_back * 2).min(MAX_PUSHBACK);
                    if std::time::Instant::now() + held_back >= give_up {
                        return Ok(response);
                    }
                    tokio::time::sleep(held_back).await;
                    continue;
                }
                Ok((i, response)) => match self.learn(i, &response) {
                    Some(redirect) => redirect,
                    None => return Ok(response),
                },
                // One broker that cannot be reached: nowhere else to look.
                Err(e) if std::time::Instant::now() >= give_up || self.len() == 1 => {
                    return Err(e);
                }
                Err(_) => false,
            };
            if std::time::Instant::now() >= give_up {
                return Err(Status::unavailable(format!(
                    "no broker of {:?} led within {:?}",
                    self.state.addrs.lock().expect("addresses"),
                    self.state.patience
                )));
            }
            if !redirect {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(MAX_WAIT);
            }
        }
    }

    /// Reads a response from broker `i` for a refusal: `None` when it is an answer,
    /// `Some(true)` when it names the leader (now the current broker), `Some(false)` when it
    /// is UNAVAILABLE without one (the next broker is current).
    fn learn(&self, i: usize, response: &http::Response<tonic::body::Body>) -> Option<bool> {
        let headers = response.headers();
        if headers.get("grpc-status").map(|v| v.as_bytes()) != Some(b"14") {
            return None;
        }
        match headers.get(LEADER_METADATA).and_then(|v| v.to_str().ok()) {
            Some(leader) => {
                self.go_to(leader);
                Some(true)
            }
            None => {
                self.next(i);
                Some(false)
            }
        }
    }
}

/// The metadata key of a refusal's retry hint, in milliseconds: gRPC's own name for it. A
/// broker sets it on RESOURCE_EXHAUSTED when a tenant is over its rate.
pub const PUSHBACK_METADATA: &str = "grpc-retry-pushback-ms";

/// The wait a RESOURCE_EXHAUSTED response asks for, if it asks for one.
fn pushback(response: &http::Response<tonic::body::Body>) -> Option<Duration> {
    let headers = response.headers();
    if headers.get("grpc-status").map(|v| v.as_bytes()) != Some(b"8") {
        return None;
    }
    let ms: u64 = headers
        .get(PUSHBACK_METADATA)?
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    Some(Duration::from_millis(ms))
}

/// The endpoint of a plain `http://` broker, with a 5 s connect timeout.
pub fn plain_endpoint(addr: &str) -> Result<Endpoint, Status> {
    Endpoint::from_shared(addr.to_string())
        .map(|e| e.connect_timeout(Duration::from_secs(5)).tcp_nodelay(true))
        .map_err(|e| Status::invalid_argument(format!("address {addr:?}: {e}")))
}

impl tower_service::Service<http::Request<tonic::body::Body>> for LeaderChannel {
    type Response = http::Response<tonic::body::Body>;
    type Error = Status;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Status>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        // Each call finds its broker (and waits for it) itself.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.clone().follow(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_split_and_get_a_scheme() {
        assert_eq!(
            parse_addresses("127.0.0.1:1, https://b:2,,"),
            vec!["http://127.0.0.1:1", "https://b:2"]
        );
    }

    fn answer(status: &str, leader: Option<&str>) -> http::Response<tonic::body::Body> {
        let mut r = http::Response::builder().header("grpc-status", status);
        if let Some(l) = leader {
            r = r.header(LEADER_METADATA, l);
        }
        r.body(tonic::body::Body::empty()).unwrap()
    }

    #[test]
    fn only_an_unavailable_answer_names_a_leader() {
        let b = LeaderChannel::new(parse_addresses("a:1,b:2"), Box::new(plain_endpoint));
        // NOT_FOUND naming a leader is the call's own answer.
        assert_eq!(b.learn(0, &answer("5", Some("c:3"))), None);
        assert_eq!(b.current(), "http://a:1");
        assert_eq!(b.learn(0, &answer("14", Some("c:3"))), Some(true));
        assert_eq!(b.current(), "http://c:3");
        // UNAVAILABLE without a leader: the next address.
        assert_eq!(b.learn(2, &answer("14", None)), Some(false));
        assert_eq!(b.current(), "http://a:1");
    }

    #[test]
    fn a_redirect_to_an_unknown_leader_adds_it() {
        let b = LeaderChannel::new(parse_addresses("a:1,b:2"), Box::new(plain_endpoint));
        b.go_to("c:3");
        assert_eq!(b.current(), "http://c:3");
        b.go_to("a:1");
        assert_eq!(b.current(), "http://a:1");
        b.next(0);
        assert_eq!(b.current(), "http://b:2");
        // A failure of a broker already left behind moves nothing.
        b.next(0);
        assert_eq!(b.current(), "http://b:2");
    }
}
