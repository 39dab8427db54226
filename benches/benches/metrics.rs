//! What one Prometheus scrape of the broker costs: `GET /metrics` over a real socket, from
//! connecting to the last byte, on a broker serving the futian-2025 fleet (238 pools) with 50
//! tenants and 3,000 requests submitted over gRPC (all placed: leases running in many pools),
//! so that the pool, model, tenant, decision and RPC families all have their series.
//!
//! `cargo bench -p suanli-benches --bench metrics`

use std::net::SocketAddr;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use suanli_broker::config::TenantConfig;
use suanli_broker::credentials::{Credentials, FILE_NAME};
use suanli_broker::{BrokerConfig, Listeners};
use suanli_core::{Catalogue, TFLOPS_PER_P, TenantSpec};
use suanli_proto::v1 as pb;
use suanli_proto::v1::tenant_service_client::TenantServiceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn get(addr: SocketAddr, path: &str) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("send");
    let mut raw = Vec::with_capacity(256 * 1024);
    s.read_to_end(&mut raw).await.expect("read");
    raw
}

/// Starts a loaded broker; returns its HTTP address (the broker runs until the process ends).
async fn loaded_broker(dir: &std::path::Path) -> SocketAddr {
    let mut config = BrokerConfig::dev_default();
    config.data_dir = dir.to_path_buf();
    config.fleet =
        suanli_sim::fleet_by_name("futian-2025", &Catalogue::builtin()).expect("futian-2025");
    config.tenants = (0..50)
        .map(|i| TenantConfig {
            spec: TenantSpec {
                name: format!("tenant-{i:02}"),
                quota_tflops: 400 * TFLOPS_PER_P,
                borrow_limit_tflops: None,
                weight: 1 + i % 4,
            },
            token: None,
        })
        .collect();
    config.http = None;
    let grpc = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let http = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let (grpc_addr, http_addr) = (grpc.local_addr().unwrap(), http.local_addr().unwrap());
    tokio::spawn(suanli_broker::run_with(
        Listeners {
            grpc,
            http: Some(http),
        },
        config,
        std::future::pending(),
    ));
    let creds = loop {
        if let Ok(c) = Credentials::load(&dir.join(FILE_NAME)) {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let channel = tonic::transport::Channel::from_shared(format!("http://{grpc_addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect");
    let mut tasks = tokio::task::JoinSet::new();
    for (i, t) in creds.tenants.iter().enumerate() {
        let bearer: tonic::metadata::MetadataValue<_> =
            format!("Bearer {}", t.token).parse().expect("token");
        let mut client = TenantServiceClient::with_interceptor(
            channel.clone(),
            move |mut r: tonic::Request<()>| {
                r.metadata_mut().insert("authorization", bearer.clone());
                Ok(r)
            },
        );
        tasks.spawn(async move {
            for j in 0..60u32 {
                let spec = pb::RequestSpec {
                    shape: Some(pb::request_spec::Shape::Gang(pb::GangShape {
                        nodes: 1 + (j % 3),
                        devices_per_node: 8,
                    })),
                    duration_ms: 3_600_000,
                    priority: 1 + (j + i as u32) as i32 % 3,
                    ..Default::default()
                };
                let _ = client
                    .submit_request(pb::SubmitRequestRequest {
                        request_id: format!("b{i}-{j}"),
                        spec: Some(spec),
                    })
                    .await;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    http_addr
}

fn scrape(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let addr = rt.block_on(loaded_broker(dir.path()));
    let body = rt.block_on(get(addr, "/metrics"));
    let text = String::from_utf8_lossy(&body);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let sample = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or("?")
            .to_string()
    };
    eprintln!(
        "one scrape: {} bytes, {} lines; {} pools, {} placements, {} standard requests queued",
        body.len(),
        text.lines().count(),
        sample("suanli_pools{health=\"healthy\"}"),
        sample("suanli_requests_placed_total"),
        sample("suanli_queue_requests{priority=\"standard\"}"),
    );
    c.bench_function("metrics/scrape/futian-2025", |b| {
        b.iter(|| rt.block_on(get(addr, "/metrics")))
    });
}

criterion_group!(benches, scrape);
criterion_main!(benches);
