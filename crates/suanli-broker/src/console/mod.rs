//! The operator console: a page served by the broker itself (HTML, script and style embedded
//! in the binary, nothing fetched from elsewhere) that polls two JSON endpoints built from the
//! published views, so it shows the figures `OperatorService` gives and never waits for the
//! writer.
//!
//! Every route but `/login` and `/logout` needs the operator's token, as the `suanli_token`
//! cookie or `Authorization: Bearer`. `GET /login?token=TOKEN` (the link the broker prints at
//! start-up) checks the token, sets the cookie and redirects to the page; `/` without a valid
//! token answers a small login form.
//!
//! - `/`, `/app.js`, `/app.css`: the page.
//! - `/api/overview?queue=N`: the fleet summary, utilisation by model, region and kind, the
//!   tenants, and the first N (default 200, at most 1000) queued requests.
//! - `/api/pools`: every pool with its health and utilisation.

mod data;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;

use crate::auth::Principal;
use crate::http::{HttpState, TOKEN_COOKIE, require_operator};

const INDEX_HTML: &str = include_str!("../../assets/console/index.html");
const LOGIN_HTML: &str = include_str!("../../assets/console/login.html");
const APP_JS: &str = include_str!("../../assets/console/app.js");
const APP_CSS: &str = include_str!("../../assets/console/app.css");

/// The page loads only its own files and talks only to its own origin.
const PAGE_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; \
     base-uri 'none'";
/// The login form carries its style inline: the stylesheet needs the token too.
const LOGIN_CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; \
     frame-ancestors 'none'; base-uri 'none'";

/// The console's routes, to merge into the broker's HTTP router.
pub(crate) fn router(state: HttpState) -> Router {
    let guarded = Router::new()
        .route("/app.js", get(app_js))
        .route("/app.css", get(app_css))
        .route("/api/overview", get(overview))
        .route("/api/pools", get(pools))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_operator,
        ));
    Router::new()
        .route("/", get(index))
        .route("/login", get(login))
        .route("/logout", get(logout))
        .merge(guarded)
        .with_state(state)
}

/// Headers every console answer carries: nothing cached (the data is live and the page is
/// behind a token), nothing sniffed, no referrer (a login link holds the token).
fn guarded_headers(
    content_type: &'static str,
    csp: &'static str,
) -> [(header::HeaderName, &'static str); 5] {
    [
        (header::CONTENT_TYPE, content_type),
        (header::CACHE_CONTROL, "no-store"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CONTENT_SECURITY_POLICY, csp),
    ]
}

const HTML: &str = "text/html; charset=utf-8";

async fn index(State(state): State<HttpState>, headers: HeaderMap) -> Response {
    if state.is_operator(&headers) {
        (guarded_headers(HTML, PAGE_CSP), INDEX_HTML).into_response()
    } else {
        login_form(StatusCode::UNAUTHORIZED, "")
    }
}

/// The login form, with a line saying why it is shown again (never an echo of the input).
fn login_form(status: StatusCode, message: &'static str) -> Response {
    let body = LOGIN_HTML.replace("{{message}}", message);
    (status, guarded_headers(HTML, LOGIN_CSP), body).into_response()
}

#[derive(Deserialize)]
struct LoginParams {
    token: Option<String>,
}

async fn login(State(state): State<HttpState>, Query(params): Query<LoginParams>) -> Response {
    let token = params.token.unwrap_or_default();
    let token = token.trim();
    if token.is_empty() {
        return login_form(StatusCode::UNAUTHORIZED, "");
    }
    let now = crate::writer::wall_ms();
    let refused = match state.tokens.lookup(token, now) {
        Ok(c) if c.principal == Principal::Operator => None,
        Ok(c) => Some(format!("token {} is not an operator's", c.name)),
        Err(why) => Some(why),
    };
    if let Some(why) = refused {
        state.trail.auth_failed(now, "console login".into(), why);
        return login_form(
            StatusCode::UNAUTHORIZED,
            "That is not the operator's token.",
        );
    }
    // A configured token could hold characters a cookie cannot carry.
    let Some(cookie) = cookie_safe(token)
        .then(|| format!("{TOKEN_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/"))
        .and_then(|c| HeaderValue::from_str(&c).ok())
    else {
        return login_form(
            StatusCode::BAD_REQUEST,
            "This token cannot be kept in a cookie; use Authorization: Bearer.",
        );
    };
    redirect_home(cookie)
}

async fn logout() -> Response {
    redirect_home(HeaderValue::from_static(
        "suanli_token=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0",
    ))
}

/// 303 to the page (relative, so the console also works under a proxy's path prefix).
fn redirect_home(cookie: HeaderValue) -> Response {
    let mut r = (
        StatusCode::SEE_OTHER,
        [
            (header::LOCATION, "./"),
            (header::CACHE_CONTROL, "no-store"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
    )
        .into_response();
    r.headers_mut().insert(header::SET_COOKIE, cookie);
    r
}

/// Whether every character of `v` may stand in a cookie value unquoted (RFC 6265).
fn cookie_safe(v: &str) -> bool {
    v.bytes()
        .all(|b| matches!(b, 0x21 | 0x23..=0x2B | 0x2D..=0x3A | 0x3C..=0x5B | 0x5D..=0x7E))
}

async fn app_js() -> Response {
    (
        guarded_headers("text/javascript; charset=utf-8", PAGE_CSP),
        APP_JS,
    )
        .into_response()
}

async fn app_css() -> Response {
    (
        guarded_headers("text/css; charset=utf-8", PAGE_CSP),
        APP_CSS,
    )
        .into_response()
}

#[derive(Deserialize)]
struct OverviewParams {
    queue: Option<usize>,
}

async fn overview(State(state): State<HttpState>, Query(p): Query<OverviewParams>) -> Response {
    let shown = p
        .queue
        .unwrap_or(data::QUEUE_SHOWN)
        .min(data::QUEUE_SHOWN_MAX);
    let snapshot = state.views.snapshot();
    json(&data::overview(&snapshot, &state.views, shown))
}

async fn pools(State(state): State<HttpState>) -> Response {
    let snapshot = state.views.snapshot();
    json(&data::pools(&snapshot))
}

fn json(value: &impl serde::Serialize) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => (guarded_headers("application/json", PAGE_CSP), body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("json: {e}\n")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_tokens_go_into_the_cookie() {
        assert!(cookie_safe("operator-0123abcdef"));
        for bad in ["a;b", "a b", "a,b", "a\"b", "a\\b", "é"] {
            assert!(!cookie_safe(bad), "{bad}");
        }
    }

    #[test]
    fn the_embedded_page_loads_its_own_files_only() {
        for page in [INDEX_HTML, LOGIN_HTML] {
            assert!(!page.contains("http://") && !page.contains("https://"));
        }
        assert!(INDEX_HTML.contains("src=\"app.js\"") && INDEX_HTML.contains("href=\"app.css\""));
        assert!(LOGIN_HTML.contains("{{message}}"));
        assert!(!APP_JS.contains("http://") && !APP_JS.contains("https://"));
    }
}
