//! What a follower answers itself, and what it sends to the leader.
//!
//! A follower serves reads of its own views: it has applied the log up to a point, so they are
//! what the leader answered a moment earlier. Every other call (every mutation, every stream
//! of the leader's, and any method added later) is answered UNAVAILABLE with the leader's
//! address before a service looks at it: a mutation must not be judged against views that
//! trail the leader's (a release of a request the follower has not seen yet would be
//! NOT_FOUND, where the leader would release it).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use super::Replica;

/// The calls a follower answers from its views.
const FOLLOWER_SERVES: &[&str] = &[
    "/suanli.v1.TenantService/GetRequest",
    "/suanli.v1.TenantService/ListRequests",
    "/suanli.v1.TenantService/GetTenant",
    "/suanli.v1.TenantService/GetStatement",
    "/suanli.v1.TenantService/ListVouchers",
    "/suanli.v1.OperatorService/GetFleetSummary",
    "/suanli.v1.OperatorService/ListPools",
    "/suanli.v1.OperatorService/GetPool",
    "/suanli.v1.OperatorService/ListTenants",
    "/suanli.v1.OperatorService/ListQueue",
    "/suanli.v1.OperatorService/ListVouchers",
    "/suanli.v1.OperatorService/GetStatement",
    "/suanli.v1.OperatorService/GetSubsidyReport",
    "/suanli.v1.OperatorService/GetReplicaStatus",
];

/// Services every replica answers whatever its role.
const ANY_ROLE_PREFIXES: &[&str] = &["/grpc.health.v1.", "/grpc.reflection."];

fn follower_serves(path: &str) -> bool {
    FOLLOWER_SERVES.contains(&path) || ANY_ROLE_PREFIXES.iter().any(|p| path.starts_with(p))
}

/// The layer that redirects what a follower does not serve.
#[derive(Clone)]
pub(crate) struct FollowerGate(pub(crate) Arc<Replica>);

impl<S> tower_layer::Layer<S> for FollowerGate {
    type Service = Gated<S>;

    fn layer(&self, inner: S) -> Gated<S> {
        Gated {
            inner,
            replica: self.0.clone(),
        }
    }
}

/// See [`FollowerGate`].
#[derive(Clone)]
pub(crate) struct Gated<S> {
    inner: S,
    replica: Arc<Replica>,
}

impl<S, B, RB> tower_service::Service<http::Request<B>> for Gated<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if self.replica.is_leader() || follower_serves(req.uri().path()) {
            return Box::pin(self.inner.call(req));
        }
        let status = tonic::Status::from(self.replica.not_leader());
        Box::pin(async move { Ok(status.into_http()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn followers_serve_reads_and_redirect_everything_else() {
        assert!(follower_serves("/suanli.v1.TenantService/GetRequest"));
        assert!(follower_serves("/grpc.health.v1.Health/Check"));
        assert!(!follower_serves("/suanli.v1.TenantService/ReleaseRequest"));
        assert!(!follower_serves("/suanli.v1.TenantService/WatchRequests"));
        assert!(!follower_serves("/suanli.v1.PoolService/ConnectAgent"));
        assert!(!follower_serves("/suanli.v1.OperatorService/Checkpoint"));
        // A method this list does not know is the leader's.
        assert!(!follower_serves("/suanli.v1.OperatorService/SomethingNew"));
    }
}
