//! The broker's HTTP side, next to gRPC: health for load balancers and supervisors, and
//! everything operators read in a browser or scrape. It reads the same published views as the
//! gRPC queries and never waits for the writer.
//!
//! - `/healthz`: the process answers. `/readyz`: its views are published and it is not
//!   stopping; the body names its role (`leader` or `follower`), and a follower's the leader,
//!   the log index its views are at and their staleness.
//! - `/metrics`: Prometheus metrics in the text format 0.0.4 (see the `metrics` module).
//! - Open on the listener when `http_open_metrics` is set; otherwise they need the operator's
//!   token like every other route.

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::auth::{Principal, Tokens};
use crate::metrics::{self, Metrics};
use crate::views::Views;

/// The name of the cookie that carries the operator's token in a browser.
pub const TOKEN_COOKIE: &str = "suanli_token";

/// What every HTTP route reads.
#[derive(Clone)]
pub(crate) struct HttpState {
    pub(crate) views: Arc<Views>,
    pub(crate) tokens: Tokens,
    /// Where failed authentications are recorded.
    pub(crate) trail: crate::trail::Trail,
    /// Turns true when the broker stops.
    pub(crate) stopping: watch::Receiver<bool>,
    /// Whether the health routes (and metrics) answer without a token.
    pub(crate) open_metrics: bool,
    /// What `/metrics` renders.
    pub(crate) metrics: Arc<Metrics>,
    /// The replica's role in its group.
    pub(crate) replica: Arc<crate::ha::Replica>,
}

impl HttpState {
    /// Whether the request carries the operator's token, as `Authorization: Bearer` or as the
    /// console's cookie.
    pub(crate) fn is_operator(&self, headers: &HeaderMap) -> bool {
        let now = crate::writer::wall_ms();
        let refused = match token_of(headers).map(|t| self.tokens.lookup(t, now)) {
            Some(Ok(c)) if c.principal == Principal::Operator => return true,
            Some(Ok(c)) => format!("token {} is not an operator's", c.name),
            Some(Err(why)) => why,
            // Not a failure: a browser's first visit, before the login form.
            None => return false,
        };
        self.trail.auth_failed(now, "http".into(), refused);
        false
    }
}

/// The token in the `authorization` header, else in the console's cookie.
fn token_of(headers: &HeaderMap) -> Option<&str> {
    if let Some(bearer) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        return Some(bearer.trim());
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == TOKEN_COOKIE)
        .map(|(_, v)| v)
}

/// Refuses a request without the operator's token: 401 with a one-line reason.
pub(crate) async fn require_operator(
    State(state): State<HttpState>,
    req: Request,
    next: Next,
) -> Response {
    if state.is_operator(req.headers()) {
        next.run(req).await
    } else {
        (
            StatusCode::UNAUTHORIZED,
            "the operator's token is needed: Authorization: Bearer TOKEN\n",
        )
            .into_response()
    }
}

/// Every HTTP route of the broker.
pub(crate) fn router(state: HttpState) -> Router {
    let mut open = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(scrape));
    if !state.open_metrics {
        open = open.route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_operator,
        ));
    }
    open.with_state(state.clone())
        .merge(crate::console::router(state))
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<HttpState>) -> Response {
    if *state.stopping.borrow() {
        (StatusCode::SERVICE_UNAVAILABLE, "stopping\n").into_response()
    } else if state.views.snapshot().pools.is_empty() {
        // The writer has not published its first view yet.
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response()
    } else if !state.replica.is_replicated() {
        "ready\n".into_response()
    } else {
        let role = state.replica.role();
        let (index, staleness) = state.replica.position(crate::writer::wall_ms());
        if role.leader {
            format!("leader\nterm {}\nlog index {index}\n", role.term).into_response()
        } else {
            let leader = role.leader_addr.as_deref().unwrap_or("unknown");
            format!("follower\nleader {leader}\nlog index {index}\nstaleness {staleness} ms\n")
                .into_response()
        }
    }
}

async fn scrape(State(state): State<HttpState>) -> Response {
    match state.metrics.render() {
        Ok(text) => ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response(),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "metrics: encoding failed\n",
        )
            .into_response(),
    }
}

/// Serves `router` on `listener` until `shutdown` completes; open requests may finish.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}
