//! The operator console's data endpoints over a real socket (BENCHMARKS.md, "The console"):
//! a broker serving futian-2025 with the fleet full and 10,000 requests waiting, asked by a
//! client the way the page asks, one fresh connection per request (the worst case: a browser
//! keeps its connection open).
//!
//! `cargo bench -p suanli-benches --bench console`
//!
//! - `console/overview`: `/api/overview`, the summary, breakdowns, tenants and the first 200
//!   queued requests (what the page polls every 1.5 s);
//! - `console/overview-1000`: the same with the longest queue list it gives;
//! - `console/pools`: `/api/pools`, every pool (238) with its groups and utilisation.

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use suanli_core::fleet::FUTIAN_2025;
use suanli_core::{Catalogue, Fleet};
use suanli_e2e::{Broker, http_get, test_config};
use suanli_proto::v1 as pb;

/// Requests kept waiting while the endpoints are measured.
const WAITING: u32 = 10_000;
/// Concurrent submitters while loading.
const SUBMITTERS: u32 = 16;

fn spec(i: u32) -> pb::RequestSpec {
    let models = ["h100", "h800", "h20", "a800", "ascend-910b", "l40s"];
    let shape = if i % 4 == 3 {
        pb::request_spec::Shape::Elastic(pb::ElasticShape {
            tflops: 2_000 + u64::from(i % 7) * 1_000,
            min_chunk_tflops: 1_000,
        })
    } else {
        pb::request_spec::Shape::Gang(pb::GangShape {
            nodes: 1 + i % 4,
            devices_per_node: 8,
        })
    };
    pb::RequestSpec {
        shape: Some(shape),
        duration_ms: 600_000 + u64::from(i % 13) * 60_000,
        priority: [
            pb::Priority::Standard,
            pb::Priority::Spot,
            pb::Priority::Critical,
        ][i as usize % 3] as i32,
        constraints: Some(pb::Constraints {
            models: if i % 4 == 3 {
                Vec::new()
            } else {
                vec![models[i as usize % models.len()].into()]
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Fills the fleet for ten hours, then submits mixed requests of all tenants until `WAITING`
/// of them wait.
async fn load(broker: &Broker) {
    let op = broker.creds.operator.clone();
    let fleet = broker
        .operator(&op)
        .await
        .get_fleet_summary(pb::GetFleetSummaryRequest::default())
        .await
        .expect("summary")
        .into_inner();
    let capacity = fleet.total.expect("total").capacity_tflops;
    let mut a = broker.tenant(&broker.tenant_token("tenant-a")).await;
    a.submit_request(pb::SubmitRequestRequest {
        request_id: "fill".into(),
        spec: Some(pb::RequestSpec {
            shape: Some(pb::request_spec::Shape::Elastic(pb::ElasticShape {
                tflops: capacity,
                min_chunk_tflops: 0,
            })),
            duration_ms: 10 * 3_600_000,
            priority: pb::Priority::Critical as i32,
            ..Default::default()
        }),
    })
    .await
    .expect("fill the fleet");
    // What does not fit the rest of the fleet is placed; submit until enough wait.
    let mut next = 0;
    loop {
        let queued = broker
            .operator(&op)
            .await
            .get_fleet_summary(pb::GetFleetSummaryRequest::default())
            .await
            .expect("summary")
            .into_inner()
            .queue
            .map_or(0, |q| q.length);
        if queued >= WAITING {
            return;
        }
        submit(broker, next, WAITING - queued).await;
        next += WAITING - queued;
    }
}

/// Submits `n` requests of all tenants, numbered from `first`, from concurrent clients.
async fn submit(broker: &Broker, first: u32, n: u32) {
    let tenants = ["tenant-a", "tenant-b", "tenant-c", "tenant-d"];
    let mut tasks = Vec::new();
    for s in 0..SUBMITTERS {
        let name = tenants[s as usize % tenants.len()];
        let mut client = broker.tenant(&broker.tenant_token(name)).await;
        tasks.push(tokio::spawn(async move {
            for i in (first + s..first + n).step_by(SUBMITTERS as usize) {
                client
                    .submit_request(pb::SubmitRequestRequest {
                        request_id: format!("wait-{i}"),
                        spec: Some(spec(i)),
                    })
                    .await
                    .expect("submit");
            }
        }));
    }
    for t in tasks {
        t.await.expect("submitter");
    }
}

fn bench_console(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = test_config(dir.path());
    config.fleet = Fleet::from_toml(FUTIAN_2025, &Catalogue::builtin()).expect("futian-2025");
    let broker = rt.block_on(async {
        let broker = Broker::start_with_http(config).await;
        load(&broker).await;
        broker
    });
    let http = broker.http.expect("http side");
    let op = broker.creds.operator.clone();
    let summary = rt.block_on(async {
        broker
            .operator(&op)
            .await
            .get_fleet_summary(pb::GetFleetSummaryRequest::default())
            .await
            .expect("summary")
            .into_inner()
    });
    let queued = summary.queue.map_or(0, |q| q.length);
    let total = summary.total.unwrap_or_default();
    eprintln!(
        "console bench: {} pools, {} of {} TFLOPS allocated, {queued} requests waiting",
        broker_pools(&rt, http, &op),
        total.allocated_tflops,
        total.capacity_tflops
    );
    assert!(queued >= WAITING, "the queue is long: {queued}");

    let mut g = c.benchmark_group("console");
    g.measurement_time(Duration::from_secs(5));
    for (name, path) in [
        ("overview", "/api/overview"),
        ("overview-1000", "/api/overview?queue=1000"),
        ("pools", "/api/pools"),
    ] {
        let size = rt.block_on(http_get(http, path, Some(&op))).body.len();
        eprintln!("console bench: {path}: {size} bytes");
        g.bench_function(name, |b| {
            b.iter(|| {
                let r = rt.block_on(http_get(http, path, Some(&op)));
                assert_eq!(r.status, 200);
                r.body.len()
            })
        });
    }
    g.finish();
    rt.block_on(broker.stop());
}

fn broker_pools(rt: &tokio::runtime::Runtime, http: std::net::SocketAddr, op: &str) -> usize {
    rt.block_on(http_get(http, "/api/pools", Some(op)))
        .body
        .matches("\"kind\":")
        .count()
}

criterion_group!(benches, bench_console);
criterion_main!(benches);
