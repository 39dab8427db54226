//! The operator console over a real socket and in a real browser. Headless Chromium loads the
//! page of a broker with a known fleet and known load; the rendered DOM must show the figures
//! `OperatorService` gives, every pool, and the queued requests with their reasons. Through a
//! proxy that stops answering, the page must say the broker is unreachable, and recover.
//!
//! Where Chromium is missing these tests print a notice and pass, unless
//! `SUANLI_REQUIRE_CHROMIUM=1` is set. `SUANLI_CHROMIUM` names another binary.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use suanli_e2e::{Broker, OperatorFigures, gang, http_get, submit, test_config};
use suanli_proto::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const HOUR: u64 = 3_600_000;

/// The small fleet with known load: `near` full, half of `far` busy, and two queued requests,
/// one waiting for capacity (`busy`) and one that no pool can ever take (`never`).
struct Loaded {
    broker: Broker,
    busy: u64,
    never: u64,
}

async fn loaded_broker(dir: &Path) -> Loaded {
    let broker = Broker::start_with_http(test_config(dir)).await;
    let mut a = broker.tenant(&broker.tenant_token("tenant-a")).await;
    let mut b = broker.tenant(&broker.tenant_token("tenant-b")).await;
    for spec in [
        submit("", gang(2, 8, "h100", HOUR)),
        submit("", gang(1, 8, "a800", HOUR)),
    ] {
        let r = a.submit_request(spec).await.expect("submit").into_inner();
        assert_eq!(
            r.state,
            pb::RequestState::Running as i32,
            "simulated: starts at once"
        );
    }
    let busy = b
        .submit_request(submit("", gang(2, 8, "h100", 60_000)))
        .await
        .expect("submit")
        .into_inner()
        .id;
    let never = b
        .submit_request(submit(
            "",
            pb::RequestSpec {
                wait_for_pools: true,
                ..gang(3, 8, "h100", 60_000)
            },
        ))
        .await
        .expect("submit")
        .into_inner()
        .id;
    // Wait for a scheduling pass to give both their reasons.
    let mut op = broker.operator(&broker.creds.operator).await;
    let wanted = [
        (busy, pb::WaitReason::CapacityBusy as i32),
        (never, pb::WaitReason::NoMatchingPool as i32),
    ];
    for _ in 0..500 {
        let queue = op
            .list_queue(pb::ListQueueRequest::default())
            .await
            .expect("list queue")
            .into_inner();
        let got: Vec<_> = queue
            .requests
            .iter()
            .map(|r| (r.id, r.wait.as_ref().map_or(0, |w| w.reason)))
            .collect();
        if got == wanted {
            return Loaded {
                broker,
                busy,
                never,
            };
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the queue never showed both requests with their reasons");
}

// ---- Chromium ---------------------------------------------------------------------------

/// The browser, or `None` (with a notice) where it is missing and not required.
fn chromium() -> Option<PathBuf> {
    let path = std::env::var_os("SUANLI_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    if path.exists() {
        return Some(path);
    }
    if std::env::var("SUANLI_REQUIRE_CHROMIUM").as_deref() == Ok("1") {
        panic!(
            "{} is missing and SUANLI_REQUIRE_CHROMIUM=1: install Debian's `chromium`",
            path.display()
        );
    }
    eprintln!(
        "NOTICE: skipping the browser test: {} not found (apt-get install chromium; \
         SUANLI_REQUIRE_CHROMIUM=1 makes this a failure)",
        path.display()
    );
    None
}

/// Runs headless Chromium on `url` with `extra` flags and returns its standard output. The
/// page runs on virtual time: `budget_ms` of it pass as fast as the page lets them (network
/// requests pause the clock), so the page polls a few times without the test waiting for it.
async fn run_chromium(browser: &Path, url: &str, budget_ms: u64, extra: &[String]) -> String {
    let profile = tempfile::tempdir().expect("profile dir");
    let mut cmd = Command::new(browser);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .arg(format!("--virtual-time-budget={budget_ms}"))
    .args(extra)
    .arg(url)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    // The broker serves on this runtime's other workers while the browser runs.
    let out = tokio::task::spawn_blocking(move || {
        let child = cmd.spawn().expect("start chromium");
        let out = child.wait_with_output().expect("chromium output");
        drop(profile);
        out
    })
    .await
    .expect("join");
    assert!(
        out.status.success(),
        "chromium failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 DOM")
}

async fn dump_dom(browser: &Path, url: &str) -> String {
    run_chromium(browser, url, 8_000, &["--dump-dom".into()]).await
}

// ---- reading the DOM ----------------------------------------------------------------------

/// The opening tag of the element with `id`.
fn tag_with_id<'a>(dom: &'a str, id: &str) -> &'a str {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no element #{id} in the DOM"));
    let start = dom[..at].rfind('<').expect("tag start");
    let end = at + dom[at..].find('>').expect("tag end");
    &dom[start..=end]
}

/// The value of attribute `name` in an opening tag.
fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let key = format!(" {name}=\"");
    let at = tag.find(&key)? + key.len();
    Some(&tag[at..at + tag[at..].find('"')?])
}

/// The exact figure an element carries in `data-value`.
fn value_of(dom: &str, id: &str) -> u64 {
    attr(tag_with_id(dom, id), "data-value")
        .unwrap_or_else(|| panic!("#{id} has no data-value"))
        .parse()
        .expect("a number")
}

/// The text right after the opening tag of `#id`.
fn text_of<'a>(dom: &'a str, id: &str) -> &'a str {
    let tag = tag_with_id(dom, id);
    let at = dom.find(tag).expect("tag") + tag.len();
    &dom[at..at + dom[at..].find('<').expect("text end")]
}

/// The table row whose opening tag has `data-NAME="VALUE"`.
fn row<'a>(dom: &'a str, name: &str, value: &str) -> Option<&'a str> {
    let at = dom.find(&format!("<tr data-{name}=\"{value}\""))?;
    Some(&dom[at..at + dom[at..].find("</tr>")?])
}

/// TFLOPS as the page shows them in P (one decimal between 1P and 100P).
fn p_text(tflops: u64) -> String {
    format!("{:.1}", tflops as f64 / 1000.0)
}

// ---- the tests ----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_the_fleet_in_a_real_browser() {
    let Some(browser) = chromium() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let Loaded {
        broker,
        busy,
        never,
    } = loaded_broker(dir.path()).await;
    let http = broker.http.expect("http side");
    let OperatorFigures {
        fleet,
        pools,
        tenants,
    } = broker.operator_figures().await;

    let login = format!("http://{http}/login?token={}", broker.creds.operator);
    let dom = dump_dom(&browser, &login).await;
    assert!(
        attr(tag_with_id(&dom, "live"), "class") == Some("pill ok"),
        "the page got its data: {}",
        tag_with_id(&dom, "live")
    );
    assert!(tag_with_id(&dom, "banner").contains("hidden"), "no banner");

    // The summary: the API's figures, exactly.
    let total = fleet.total.expect("total");
    let local = fleet.local.expect("local");
    let external = fleet.external.expect("external");
    let figures = [
        ("total-capacity", total.capacity_tflops),
        ("total-allocated", total.allocated_tflops),
        ("total-free", total.capacity_tflops - total.allocated_tflops),
        ("local-capacity", local.capacity_tflops),
        ("local-allocated", local.allocated_tflops),
        ("external-capacity", external.capacity_tflops),
        ("external-allocated", external.allocated_tflops),
        ("live-leases", u64::from(fleet.live_leases)),
        (
            "queue-length",
            u64::from(fleet.queue.expect("queue").length),
        ),
        (
            "pools-healthy",
            u64::from(fleet.pools.expect("health").healthy),
        ),
    ];
    for (id, want) in figures {
        assert_eq!(value_of(&dom, id), want, "#{id}");
    }
    assert!(
        total.allocated_tflops > 0 && fleet.live_leases == 2,
        "the load is there"
    );
    assert_eq!(
        text_of(&dom, "total-capacity"),
        p_text(total.capacity_tflops)
    );
    assert_eq!(
        text_of(&dom, "total-allocated"),
        p_text(total.allocated_tflops)
    );

    // Utilisation by model and by region: a bar for each part, with its figures.
    for part in fleet.by_model.iter().chain(&fleet.by_region) {
        let needle = format!("class=\"bar\" data-key=\"{}\"", part.key);
        let at = dom
            .find(&needle)
            .unwrap_or_else(|| panic!("no bar for {}", part.key));
        let tag = &dom[at..at + dom[at..].find('>').expect("tag end")];
        let u = part.utilisation.expect("utilisation");
        let capacity = u.capacity_tflops.to_string();
        let allocated = u.allocated_tflops.to_string();
        assert_eq!(attr(tag, "data-capacity"), Some(capacity.as_str()), "{tag}");
        assert_eq!(
            attr(tag, "data-allocated"),
            Some(allocated.as_str()),
            "{tag}"
        );
    }
    assert!(
        !dom.contains("[object "),
        "every element rendered as an element"
    );

    // Every pool has its row with its figures.
    assert_eq!(dom.matches("<tr data-pool=").count(), pools.len());
    for p in &pools {
        let r = row(&dom, "pool", &p.id).unwrap_or_else(|| panic!("no row for pool {}", p.id));
        let u = p.utilisation.expect("utilisation");
        assert!(
            r.contains(&format!("data-value=\"{}\"", u.capacity_tflops)),
            "{r}"
        );
        assert!(
            r.contains(&format!("data-value=\"{}\"", u.allocated_tflops)),
            "{r}"
        );
        assert!(
            r.contains(">healthy<") && r.contains(&format!(">{}<", p.region)),
            "{r}"
        );
    }

    // The queued requests, with their reasons, in queue order.
    let busy_row = row(&dom, "request", &busy.to_string()).expect("the busy request's row");
    assert!(
        busy_row.contains("data-reason=\"capacity_busy\""),
        "{busy_row}"
    );
    assert!(
        busy_row.contains(">capacity busy<") && busy_row.contains(">tenant-b<"),
        "{busy_row}"
    );
    assert!(busy_row.contains(">2×8 h100<"), "{busy_row}");
    let never_row = row(&dom, "request", &never.to_string()).expect("the other request's row");
    assert!(never_row.contains(">no matching pool<"), "{never_row}");
    assert!(dom.find(busy_row) < dom.find(never_row), "queue order");

    // Tenants' usage against their quota.
    for t in &tenants {
        let at = dom
            .find(&format!("data-tenant=\"{}\"", t.id))
            .unwrap_or_else(|| panic!("no usage bar for {}", t.id));
        let tag = &dom[at..at + dom[at..].find('>').expect("tag end")];
        let used = t.usage.unwrap_or_default().used_tflops.to_string();
        let quota = t.quota_tflops.to_string();
        assert_eq!(attr(tag, "data-value"), Some(used.as_str()), "{tag}");
        assert_eq!(attr(tag, "data-quota"), Some(quota.as_str()), "{tag}");
    }

    // The screenshot, kept as an artifact of the test run.
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console.png");
    let _ = std::fs::remove_file(&shot);
    run_chromium(
        &browser,
        &login,
        8_000,
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=1400,1000".into(),
        ],
    )
    .await;
    let png = std::fs::read(&shot).expect("the screenshot was written");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    println!("console screenshot: {}", shot.display());
    broker.stop().await;
}

/// A proxy in front of the broker's HTTP side that answers the first `pass_first` data
/// requests, drops the next `drop_next` (as if the broker were gone), and answers again after.
/// It counts requests, not time, so the browser's virtual clock cannot race it.
async fn flaky_proxy(broker: SocketAddr, pass_first: usize, drop_next: usize) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let _ = proxy_one(client, broker, &seen, pass_first, drop_next).await;
            });
        }
    });
    addr
}

/// One request per connection: read its head, then drop it or forward it with
/// `Connection: close` and copy the answer back.
async fn proxy_one(
    mut client: TcpStream,
    broker: SocketAddr,
    seen: &AtomicUsize,
    pass_first: usize,
    drop_next: usize,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = client.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    if text.starts_with("GET /api/") {
        let n = seen.fetch_add(1, Ordering::SeqCst);
        if n >= pass_first && n < pass_first + drop_next {
            return Ok(()); // Dropped unanswered: the browser sees a network error.
        }
    }
    let request: String = text
        .split("\r\n")
        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
        .collect::<Vec<_>>()
        .join("\r\n")
        .replacen("\r\n", "\r\nConnection: close\r\n", 1);
    let mut upstream = TcpStream::connect(broker).await?;
    upstream.write_all(request.as_bytes()).await?;
    tokio::io::copy(&mut upstream, &mut client).await?;
    client.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_says_when_the_broker_is_unreachable_and_recovers() {
    let Some(browser) = chromium() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start_with_http(test_config(dir.path())).await;
    let http = broker.http.expect("http side");
    let token = broker.creds.operator.clone();

    // One poll (two data requests) answered, then nothing: the banner, and the last figures.
    let proxy = flaky_proxy(http, 2, usize::MAX / 2).await;
    let dom = dump_dom(&browser, &format!("http://{proxy}/login?token={token}")).await;
    let banner = tag_with_id(&dom, "banner");
    assert!(!banner.contains("hidden"), "the banner shows: {banner}");
    assert!(
        text_of(&dom, "banner").starts_with("Broker unreachable"),
        "{dom}"
    );
    assert_eq!(text_of(&dom, "live"), "unreachable");
    let body = &dom[dom.find("<body").expect("body")..];
    let body = &body[..=body.find('>').expect("body tag")];
    assert_eq!(
        attr(body, "class"),
        Some("stale"),
        "the stale figures are dimmed"
    );
    assert!(
        dom.contains("<tr data-pool=\"near\""),
        "the last figures stay"
    );

    // The first two polls fail, then the broker answers: the banner goes.
    let proxy = flaky_proxy(http, 0, 4).await;
    let dom = dump_dom(&browser, &format!("http://{proxy}/login?token={token}")).await;
    assert!(tag_with_id(&dom, "banner").contains("hidden"), "recovered");
    assert_eq!(text_of(&dom, "live"), "live");
    assert!(dom.contains("<tr data-pool=\"near\""));
    broker.stop().await;
}

/// `GET path` with the console's cookie instead of a bearer token.
async fn get_with_cookie(addr: SocketAddr, path: &str, cookie: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nCookie: {cookie}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("send");
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.expect("read");
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    (status, raw)
}

#[tokio::test]
async fn the_console_needs_the_operator_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start_with_http(test_config(dir.path())).await;
    let http = broker.http.expect("http side");
    let op = broker.creds.operator.clone();
    let tenant = broker.tenant_token("tenant-a");

    // Without a token the page is a login form, and nothing else answers.
    let page = http_get(http, "/", None).await;
    assert_eq!(page.status, 401);
    assert!(page.body.contains("name=\"token\"") && !page.body.contains("pool-rows"));
    for path in ["/api/overview", "/api/pools", "/app.js", "/app.css"] {
        assert_eq!(http_get(http, path, None).await.status, 401, "{path}");
        assert_eq!(
            http_get(http, path, Some(&tenant)).await.status,
            401,
            "{path} as a tenant"
        );
        assert_eq!(
            http_get(http, path, Some("nonsense")).await.status,
            401,
            "{path}"
        );
        assert_eq!(
            http_get(http, path, Some(&op)).await.status,
            200,
            "{path} as the operator"
        );
    }
    assert_eq!(http_get(http, "/", Some(&tenant)).await.status, 401);
    let page = http_get(http, "/", Some(&op)).await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("id=\"pool-rows\""));

    // The login link: only the operator's token gets the cookie.
    for bad in [
        "/login".to_string(),
        "/login?token=".into(),
        "/login?token=nonsense".into(),
        format!("/login?token={tenant}"),
    ] {
        let r = http_get(http, &bad, None).await;
        assert_eq!(r.status, 401, "{bad}");
        assert!(r.header("set-cookie").is_none(), "{bad}");
    }
    let r = http_get(http, &format!("/login?token={op}"), None).await;
    assert_eq!(r.status, 303);
    assert_eq!(r.header("location"), Some("./"));
    assert_eq!(
        r.header("set-cookie"),
        Some(format!("suanli_token={op}; HttpOnly; SameSite=Strict; Path=/").as_str())
    );
    let (status, body) = get_with_cookie(http, "/api/pools", &format!("suanli_token={op}")).await;
    assert_eq!(status, 200);
    assert!(body.contains("\"id\":\"near\"") && body.contains("\"id\":\"far\""));
    let (status, _) = get_with_cookie(http, "/api/pools", &format!("suanli_token={tenant}")).await;
    assert_eq!(status, 401, "a tenant's token in the cookie");
    let out = http_get(http, "/logout", None).await;
    assert_eq!(out.status, 303);
    assert!(
        out.header("set-cookie")
            .is_some_and(|c| c.contains("Max-Age=0"))
    );

    // Bad input is refused, never a crash; the queue list is capped.
    for bad in [
        "/api/overview?queue=abc",
        "/api/overview?queue=-1",
        "/login?token=%ZZ",
    ] {
        let status = http_get(http, bad, Some(&op)).await.status;
        assert!((400..500).contains(&status), "{bad}: {status}");
    }
    let ok = http_get(http, "/api/overview?queue=99999999", Some(&op)).await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.header("content-type"), Some("application/json"));
    broker.stop().await;
}

#[tokio::test]
async fn the_data_endpoints_give_the_api_figures() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Loaded { broker, busy, .. } = loaded_broker(dir.path()).await;
    let http = broker.http.expect("http side");
    let op = broker.creds.operator.clone();
    let fleet = broker
        .operator(&op)
        .await
        .get_fleet_summary(pb::GetFleetSummaryRequest::default())
        .await
        .expect("summary")
        .into_inner();
    let total = fleet.total.expect("total");
    let overview = http_get(http, "/api/overview", Some(&op)).await.body;
    assert!(
        overview.contains(&format!(
            "\"total\":{{\"capacity_tflops\":{},\"allocated_tflops\":{},\"free_tflops\":{}",
            total.capacity_tflops,
            total.allocated_tflops,
            total.capacity_tflops - total.allocated_tflops
        )),
        "{overview}"
    );
    assert!(overview.contains(&format!("\"live_leases\":{}", fleet.live_leases)));
    assert!(overview.contains("\"queue\":{\"length\":2,"), "{overview}");
    assert!(
        overview.contains(&format!(
            "{{\"id\":{busy},\"position\":1,\"tenant\":\"tenant-b\",\"shape\":\"gang\",\"nodes\":2"
        )),
        "{overview}"
    );
    assert!(overview.contains("\"reason\":\"capacity_busy\""));
    assert!(overview.contains("\"reason\":\"no_matching_pool\""));
    let one = http_get(http, "/api/overview?queue=1", Some(&op))
        .await
        .body;
    assert_eq!(
        one.matches("\"position\":").count(),
        1,
        "capped at 1: {one}"
    );
    broker.stop().await;
}
