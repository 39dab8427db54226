//! Following the leader of a group of brokers.
//!
//! A group is several replicas; one leads. A follower answers a mutation (and a stream) with
//! UNAVAILABLE and, when it knows the leader, the leader's `host:port` in the
//! [`LEADER_METADATA`] key. [`Brokers`] holds the addresses a client was given, remembers
//! which one leads, and retries a call there: on a redirect it goes to the named leader at
//! once; on a broker it cannot reach (or that went away during the call), or UNAVAILABLE
//! without a leader (an election under way), it tries the next address after a wait that doubles from 50 ms to 1 s, for at most
//! [`Brokers::patience`] in all; an attempt that takes longer than
//! [`Brokers::attempt_timeout`] (a paused broker answers nothing) counts as unreachable.
//! Every other answer is the call's own.
//!
//! A retried mutation is safe when it carries a `request_id`: the broker answers a repeated
//! id with the first answer, and a follower never applied it.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// The metadata key of the leader's address on a follower's UNAVAILABLE.
pub const LEADER_METADATA: &str = "suanli-leader";

/// The leader a follower named in `status`, if any.
pub fn leader_hint(status: &Status) -> Option<String> {
    if status.code() != Code::Unavailable {
        return None;
    }
    status
        .metadata()
        .get(LEADER_METADATA)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// Whether `status` says the broker could not be reached, or the connection broke during
/// the call (a broker killed mid-call): the call's outcome is unknown, so only a call with a
/// `request_id` may be retried elsewhere, which is what the API's mutations carry.
pub fn is_unreachable(status: &Status) -> bool {
    if status.code() == Code::Unavailable {
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

/// The brokers of a group, as one client sees them.
pub struct Brokers {
    addrs: Vec<String>,
    /// Index in `addrs` of the broker believed to lead.
    current: usize,
    channel: Option<Channel>,
    endpoint: EndpointOf,
    patience: Duration,
    attempt: Duration,
}

impl Brokers {
    /// The brokers at `addrs` (URLs), reached through endpoints `endpoint` builds.
    pub fn new(addrs: Vec<String>, endpoint: EndpointOf) -> Self {
        Brokers {
            addrs,
            current: 0,
            channel: None,
            endpoint,
            patience: Duration::from_secs(30),
            attempt: Duration::from_secs(5),
        }
    }

    /// Plain `http://` brokers at `addrs`, with a 5 s connect timeout.
    pub fn plain(addrs: Vec<String>) -> Self {
        Self::new(
            addrs,
            Box::new(|a| {
                Endpoint::from_shared(a.to_string())
                    .map(|e| e.connect_timeout(Duration::from_secs(5)).tcp_nodelay(true))
                    .map_err(|e| Status::invalid_argument(format!("address {a:?}: {e}")))
            }),
        )
    }

    /// How long a call may keep looking for the leader before it fails.
    pub fn patience(mut self, patience: Duration) -> Self {
        self.patience = patience;
        self
    }

    /// How long one attempt may take before it is abandoned for the next broker: a broker
    /// that is paused, or cut off, answers nothing at all.
    pub fn attempt_timeout(mut self, attempt: Duration) -> Self {
        self.attempt = attempt;
        self
    }

    /// The address of the broker believed to lead.
    pub fn current(&self) -> &str {
        &self.addrs[self.current]
    }

    /// A channel to the broker believed to lead, connecting if needed.
    pub async fn channel(&mut self) -> Result<Channel, Status> {
        if let Some(c) = &self.channel {
            return Ok(c.clone());
        }
        let addr = self.addrs[self.current].clone();
        let endpoint = (self.endpoint)(&addr)?;
        let channel = endpoint.connect().await.map_err(|e| {
            Status::unavailable(format!("cannot connect to the broker at {addr}: {e}"))
        })?;
        self.channel = Some(channel.clone());
        Ok(channel)
    }

    /// Goes to `addr` (`host:port` or a URL) next, adding it to the list if it is new.
    pub fn go_to(&mut self, addr: &str) {
        let url = with_scheme(addr);
        let index = match self.addrs.iter().position(|a| *a == url) {
            Some(i) => i,
            None => {
                self.addrs.push(url);
                self.addrs.len() - 1
            }
        };
        if index != self.current {
            self.current = index;
            self.channel = None;
        }
    }

    /// Goes to the next address of the list.
    pub fn next(&mut self) {
        self.current = (self.current + 1) % self.addrs.len();
        self.channel = None;
    }

    /// Decides what to do after `status`: `true` to try again (at the leader it names, or at
    /// the next address after `wait`), `false` when the status is the call's own answer.
    pub async fn should_retry(&mut self, status: &Status, wait: &mut Duration) -> bool {
        if !is_unreachable(status) {
            return false;
        }
        match leader_hint(status) {
            Some(leader) if with_scheme(&leader) != self.addrs[self.current] => {
                self.go_to(&leader);
            }
            _ => {
                self.next();
                tokio::time::sleep(*wait).await;
                *wait = (*wait * 2).min(Duration::from_secs(1));
            }
        }
        true
    }

    /// Runs `call` on a channel to the leader, following redirects and trying the other
    /// addresses while the group elects a leader, for at most the patience.
    pub async fn call<T, F, Fut>(&mut self, mut call: F) -> Result<T, Status>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let give_up = std::time::Instant::now() + self.patience;
        let mut wait = Duration::from_millis(50);
        loop {
            let result = match self.channel().await {
                Ok(channel) => match tokio::time::timeout(self.attempt, call(channel)).await {
                    Ok(result) => result,
                    Err(_) => Err(Status::unavailable(format!(
                        "the broker at {} did not answer within {:?}",
                        self.current(),
                        self.attempt
                    ))),
                },
                Err(e) => Err(e),
            };
            match result {
                Ok(t) => return Ok(t),
                Err(status) => {
                    if std::time::Instant::now() >= give_up
                        || !self.should_retry(&status, &mut wait).await
                    {
                        return Err(status);
                    }
                }
            }
        }
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

    #[test]
    fn only_an_unavailable_answer_names_a_leader() {
        let mut s = Status::unavailable("follower");
        s.metadata_mut()
            .insert(LEADER_METADATA, "10.0.0.2:50051".parse().unwrap());
        assert_eq!(leader_hint(&s).as_deref(), Some("10.0.0.2:50051"));
        let mut other = Status::not_found("x");
        other
            .metadata_mut()
            .insert(LEADER_METADATA, "10.0.0.2:50051".parse().unwrap());
        assert_eq!(leader_hint(&other), None);
    }

    #[test]
    fn a_redirect_to_an_unknown_leader_adds_it() {
        let mut b = Brokers::plain(parse_addresses("a:1,b:2"));
        b.go_to("c:3");
        assert_eq!(b.current(), "http://c:3");
        b.go_to("a:1");
        assert_eq!(b.current(), "http://a:1");
        b.next();
        assert_eq!(b.current(), "http://b:2");
    }
}
