//! `/metrics` on a real socket: its figures against the API's after real calls, and the text
//! checked by `promtool check metrics` (Debian's package `prometheus`). Where promtool is
//! missing that check is skipped with a notice, unless `SUANLI_REQUIRE_PROMTOOL=1`.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use suanli_e2e::{Broker, OperatorFigures, gang, http_get, submit, test_config};

const HOUR: u64 = 3_600_000;
use suanli_proto::v1 as pb;
use tonic::Code;

/// One parsed sample line: `name{k="v",...} value`.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

fn parse(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line.rsplit_once(' ').expect("a value after the series");
        let value = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("value in {line:?}")),
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("closing brace");
                let labels = body
                    .split("\",")
                    .filter(|kv| !kv.is_empty())
                    .map(|kv| {
                        let (k, v) = kv.split_once("=\"").expect("label=\"value\"");
                        (k.to_string(), v.trim_end_matches('"').to_string())
                    })
                    .collect();
                (name, labels)
            }
            None => (series, Vec::new()),
        };
        out.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    out
}

/// The value of the one sample named `name` that carries every label in `labels`; panics when
/// there is none or more than one.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v))
        })
        .collect();
    match found[..] {
        [one] => one.value,
        [] => panic!("no sample {name} {labels:?}"),
        _ => panic!("several samples {name} {labels:?}: {found:?}"),
    }
}

/// Runs `promtool check metrics` on `text`: `None` when promtool is not installed (and not
/// required), else its verdict and output.
fn promtool(text: &str) -> Option<(bool, String)> {
    let required = std::env::var("SUANLI_REQUIRE_PROMTOOL").is_ok_and(|v| v == "1");
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
            println!(
                "NOTICE: promtool is not on PATH (Debian package `prometheus`): the promtool \
                 check of /metrics is skipped; set SUANLI_REQUIRE_PROMTOOL=1 to make this a \
                 failure"
            );
            return None;
        }
        Err(e) => panic!("promtool is required (SUANLI_REQUIRE_PROMTOOL=1) but: {e}"),
    };
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool ran");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some((out.status.success(), said))
}

#[tokio::test]
async fn metrics_agree_with_the_api_and_pass_promtool() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start_with_http(test_config(dir.path())).await;
    let http = broker.http.expect("http side");
    let mut a = broker.tenant(&broker.tenant_token("tenant-a")).await;

    // Two placements (one node of `near`, one of `far`), then a gang that needs both nodes of
    // `near` and must wait for the first to end.
    a.submit_request(submit("m1", gang(1, 8, "h100", HOUR)))
        .await
        .expect("placed on near");
    a.submit_request(submit("m2", gang(1, 4, "a800", HOUR)))
        .await
        .expect("placed on far");
    let waiting = a
        .submit_request(submit("m3", gang(2, 8, "h100", HOUR)))
        .await
        .expect("queued")
        .into_inner();
    assert_eq!(waiting.state, pb::RequestState::Queued as i32);
    let bad = a
        .submit_request(submit(
            "m4",
            pb::RequestSpec {
                duration_ms: 5,
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    // A trailers-only refusal from the authentication interceptor.
    let mut stranger = broker.tenant("no-such-token").await;
    let refused = stranger
        .list_requests(pb::ListRequestsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);

    // The first scheduling pass gives the waiting request its reason.
    let reason = {
        let mut tries = 0;
        loop {
            let r = a
                .get_request(pb::GetRequestRequest {
                    name: waiting.name.clone(),
                })
                .await
                .expect("get")
                .into_inner();
            let reason = r.wait.map_or(0, |w| w.reason);
            if reason != pb::WaitReason::Pending as i32 && reason != 0 {
                break pb::WaitReason::try_from(reason).expect("a wait reason");
            }
            tries += 1;
            assert!(tries < 500, "the waiting request never got a reason");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    assert_eq!(reason, pb::WaitReason::CapacityBusy);

    // The fleet's queue counts are published with the fleet views, which may trail the
    // request's own wait information by a moment: scrape until they show the reason too.
    let reason_label = [("reason", "capacity_busy")];
    let mut tries = 0;
    let (scraped, m) = loop {
        let scraped = http_get(http, "/metrics", None).await;
        assert_eq!(scraped.status, 200, "{}", scraped.body);
        let m = parse(&scraped.body);
        let shown = m.iter().any(|s| {
            s.name == "suanli_queue_requests_by_reason"
                && s.labels
                    .iter()
                    .any(|(k, v)| k == "reason" && v == "capacity_busy")
                && s.value == 1.0
        });
        if shown {
            break (scraped, m);
        }
        tries += 1;
        assert!(
            tries < 500,
            "the queue counts never showed the waiting request"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(
        scraped.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let OperatorFigures {
        fleet,
        pools,
        tenants,
    } = broker.operator_figures().await;

    // Pools: every figure equals the pool view's.
    assert_eq!(pools.len(), 2);
    for p in &pools {
        let u = p.utilisation.expect("utilisation");
        let l = [("pool", p.id.as_str())];
        for (name, want) in [
            ("suanli_pool_capacity_tflops", u.capacity_tflops),
            ("suanli_pool_allocated_tflops", u.allocated_tflops),
            ("suanli_pool_capacity_devices", u.capacity_devices),
            ("suanli_pool_allocated_devices", u.allocated_devices),
        ] {
            assert_eq!(value(&m, name, &l), want as f64, "{name} of {}", p.id);
        }
        let health = value(&m, "suanli_pool_health", &[l[0], ("health", "healthy")]);
        assert_eq!(health, 1.0);
    }
    let near = [("pool", "near"), ("kind", "local_centre")];
    assert_eq!(value(&m, "suanli_pool_allocated_devices", &near), 8.0);
    let far = [("pool", "far"), ("region", "guizhou-guiyang")];
    assert_eq!(value(&m, "suanli_pool_allocated_devices", &far), 4.0);
    for k in &fleet.by_model {
        let u = k.utilisation.expect("utilisation");
        let l = [("model", k.key.as_str())];
        assert_eq!(
            value(&m, "suanli_model_allocated_tflops", &l),
            u.allocated_tflops as f64
        );
        assert_eq!(
            value(&m, "suanli_model_capacity_devices", &l),
            u.capacity_devices as f64
        );
    }
    assert_eq!(value(&m, "suanli_pools", &[("health", "healthy")]), 2.0);
    assert_eq!(
        value(&m, "suanli_fleet_target_tflops", &[]),
        fleet.target_tflops as f64
    );

    // The queue: the waiting request, with its reason.
    assert_eq!(
        value(&m, "suanli_queue_requests_by_reason", &reason_label),
        1.0
    );
    assert_eq!(
        value(
            &m,
            "suanli_queue_requests_by_reason",
            &[("reason", "quota")]
        ),
        0.0
    );
    assert_eq!(
        value(&m, "suanli_queue_requests", &[("priority", "standard")]),
        1.0
    );

    // Leases and decisions.
    let placed = value(&m, "suanli_leases", &[("state", "placed")]);
    let running = value(&m, "suanli_leases", &[("state", "running")]);
    assert_eq!(placed + running, f64::from(fleet.live_leases));
    assert_eq!(
        running, 2.0,
        "simulated pools start a lease as it is placed"
    );
    assert_eq!(value(&m, "suanli_requests_submitted_total", &[]), 3.0);
    assert_eq!(value(&m, "suanli_requests_placed_total", &[]), 2.0);
    // Both were placed at submission: two waits of nothing.
    let waits = (
        value(&m, "suanli_request_queue_wait_seconds_count", &[]),
        value(&m, "suanli_request_queue_wait_seconds_sum", &[]),
    );
    assert_eq!(waits, (2.0, 0.0));
    assert_eq!(
        value(
            &m,
            "suanli_commands_total",
            &[("command", "submit"), ("outcome", "applied")]
        ),
        3.0
    );
    let submit_decisions = value(
        &m,
        "suanli_decision_seconds_count",
        &[("command", "submit")],
    );
    assert_eq!(submit_decisions, 3.0);
    assert!(value(&m, "suanli_writer_commit_seconds_count", &[]) >= 1.0);

    // Tenants.
    for t in &tenants {
        let l = [("tenant", t.id.as_str())];
        let usage = t.usage.expect("usage");
        assert_eq!(
            value(&m, "suanli_tenant_used_tflops", &l),
            usage.used_tflops as f64
        );
        assert_eq!(
            value(&m, "suanli_tenant_quota_tflops", &l),
            t.quota_tflops as f64
        );
    }
    let used_a = value(&m, "suanli_tenant_used_tflops", &[("tenant", "tenant-a")]);
    assert!(used_a > 0.0);

    // RPCs by method and final code: the status in a successful call's trailers, and in the
    // headers of trailers-only errors.
    let rpc = |method: &str, code: &str| {
        value(
            &m,
            "suanli_grpc_server_handled_total",
            &[("grpc_method", method), ("grpc_code", code)],
        )
    };
    assert_eq!(rpc("SubmitRequest", "OK"), 3.0);
    assert_eq!(rpc("SubmitRequest", "InvalidArgument"), 1.0);
    assert_eq!(rpc("ListRequests", "Unauthenticated"), 1.0);
    assert!(rpc("GetRequest", "OK") >= 1.0);
    assert_eq!(
        value(
            &m,
            "suanli_grpc_server_handling_seconds_count",
            &[
                ("grpc_service", "suanli.v1.TenantService"),
                ("grpc_method", "SubmitRequest")
            ]
        ),
        4.0
    );

    match promtool(&scraped.body) {
        None => {}
        Some((ok, said)) => assert!(
            ok && said.trim().is_empty(),
            "promtool check metrics: {said}\n--- scraped:\n{}",
            scraped.body
        ),
    }
    broker.stop().await;
}

#[tokio::test]
async fn a_restarted_broker_counts_its_recovered_leases_but_not_old_events() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = test_config(dir.path());
    // A snapshot after every batch: recovery installs one, then replays the log after it.
    config.snapshot_every = 1;
    let broker = Broker::start(config.clone()).await;
    let mut a = broker.tenant(&broker.tenant_token("tenant-a")).await;
    for (id, model) in [("r1", "h100"), ("r2", "a800"), ("r3", "h100")] {
        a.submit_request(submit(id, gang(1, 8, model, HOUR)))
            .await
            .expect("placed");
    }
    broker.stop().await;

    let broker = Broker::start_with_http(config).await;
    let mut op = broker.operator(&broker.creds.operator).await;
    let fleet = op
        .get_fleet_summary(pb::GetFleetSummaryRequest::default())
        .await
        .expect("fleet")
        .into_inner();
    assert_eq!(fleet.live_leases, 3);
    let m = parse(
        &http_get(broker.http.expect("http"), "/metrics", None)
            .await
            .body,
    );
    let placed = value(&m, "suanli_leases", &[("state", "placed")]);
    let running = value(&m, "suanli_leases", &[("state", "running")]);
    assert_eq!(placed + running, 3.0);
    assert_eq!(
        value(&m, "suanli_requests_submitted_total", &[]),
        0.0,
        "counters count this run's events, not the log's"
    );
    broker.stop().await;
}

#[tokio::test]
async fn closed_metrics_need_the_operator_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = test_config(dir.path());
    config.http_open_metrics = false;
    let broker = Broker::start_with_http(config).await;
    let http = broker.http.expect("http side");
    assert_eq!(http_get(http, "/metrics", None).await.status, 401);
    let tenant = broker.tenant_token("tenant-a");
    assert_eq!(http_get(http, "/metrics", Some(&tenant)).await.status, 401);
    let op = broker.creds.operator.clone();
    let got = http_get(http, "/metrics", Some(&op)).await;
    assert_eq!(got.status, 200);
    let m = parse(&got.body);
    assert_eq!(value(&m, "suanli_pools", &[("health", "healthy")]), 2.0);
    broker.stop().await;
}

#[test]
fn the_parser_reads_labels_and_values() {
    let m = parse(
        "# HELP x_total X.\n# TYPE x_total counter\n\
         x_total{a=\"1\",b=\"two words\"} 3\ny 0.5\nz_bucket{le=\"+Inf\"} 7\n",
    );
    assert_eq!(value(&m, "x_total", &[("b", "two words")]), 3.0);
    assert_eq!(value(&m, "y", &[]), 0.5);
    assert_eq!(value(&m, "z_bucket", &[("le", "+Inf")]), 7.0);
}
