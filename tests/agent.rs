//! A pool that joins through its agent: the broker tells the agent which leases to start, the
//! agent reports them, and a silent agent makes its pool lost (its leases requeued) until it
//! comes back, and a node the agent reports down loses its leases until it is back.

use std::time::Duration;

use suanli_e2e::{Bearer, Broker, agent_hello, test_config};
use suanli_proto::v1 as pb;
use suanli_proto::v1::pool_service_client::PoolServiceClient;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

fn hello(running: Vec<u64>) -> pb::AgentMessage {
    agent_hello("near", running)
}

fn report(request: u64, kind: pb::LeaseReportKind) -> pb::AgentMessage {
    pb::AgentMessage {
        body: Some(pb::agent_message::Body::LeaseReport(pb::LeaseReport {
            request,
            kind: kind as i32,
            time_unix_ms: 0,
            detail: String::new(),
            ..Default::default()
        })),
    }
}

/// One whole H100 node for an hour, back to the queue if its lease is lost: only `near` has
/// H100s, so its agent runs it.
fn one_h100_node() -> pb::RequestSpec {
    pb::RequestSpec {
        shape: Some(pb::request_spec::Shape::Gang(pb::GangShape {
            nodes: 1,
            devices_per_node: 8,
        })),
        duration_ms: 3_600_000,
        constraints: Some(pb::Constraints {
            models: vec!["h100".into()],
            ..Default::default()
        }),
        requeue: true,
        ..Default::default()
    }
}

/// The next message from the broker that is not an acknowledgement of a report.
async fn next(stream: &mut Streaming<pb::BrokerMessage>) -> pb::broker_message::Body {
    loop {
        match next_any(stream).await {
            pb::broker_message::Body::ReportAck(_) => continue,
            body => return body,
        }
    }
}

async fn next_any(stream: &mut Streaming<pb::BrokerMessage>) -> pb::broker_message::Body {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("a message within 10 s")
        .expect("stream open")
        .expect("no error")
        .body
        .expect("a body")
}

/// The broker acknowledges a report once it has dealt with it.
async fn expect_ack(
    stream: &mut Streaming<pb::BrokerMessage>,
    request: u64,
    kind: pb::LeaseReportKind,
) {
    match next_any(stream).await {
        pb::broker_message::Body::ReportAck(a) => {
            assert_eq!((a.request, a.kind), (request, kind as i32), "{a:?}");
        }
        other => panic!("expected a ReportAck, got {other:?}"),
    }
}

/// Sends a heartbeat every 50 ms until aborted (the broker's timeout in this test is 300 ms).
fn keep_alive(tx: mpsc::Sender<pb::AgentMessage>) -> tokio::task::JoinHandle<()> {
    let heartbeat = pb::AgentMessage {
        body: Some(pb::agent_message::Body::Heartbeat(pb::Heartbeat {
            time_unix_ms: 0,
            nodes: vec![],
        })),
    };
    tokio::spawn(async move {
        while tx.send(heartbeat.clone()).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

/// Opens the agent stream of `near` with a hello and checks the broker's welcome.
async fn connect(
    pool: &mut PoolServiceClient<InterceptedService<Channel, Bearer>>,
) -> (mpsc::Sender<pb::AgentMessage>, Streaming<pb::BrokerMessage>) {
    connect_as(pool, "near").await
}

/// Opens the agent stream of `id` with a hello and checks the broker's welcome.
async fn connect_as(
    pool: &mut PoolServiceClient<InterceptedService<Channel, Bearer>>,
    id: &str,
) -> (mpsc::Sender<pb::AgentMessage>, Streaming<pb::BrokerMessage>) {
    let (tx, rx) = mpsc::channel(16);
    tx.send(agent_hello(id, vec![])).await.unwrap();
    let mut from_broker = pool
        .connect_agent(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        next(&mut from_broker).await,
        pb::broker_message::Body::Welcome(_)
    ));
    (tx, from_broker)
}

async fn request_state(broker: &Broker, token: &str, name: &str) -> pb::Request {
    let mut t = broker.tenant(token).await;
    t.get_request(pb::GetRequestRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner()
}

async fn eventually(
    broker: &Broker,
    token: &str,
    name: &str,
    want: pb::RequestState,
) -> pb::Request {
    for _ in 0..500 {
        let r = request_state(broker, token, name).await;
        if r.state == want as i32 {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{name} never reached {want:?}");
}

/// Whether pool `near` comes to satisfy `wanted` within five seconds. The pool views are
/// republished after the batch that changed them, so they may trail a request's record.
async fn near_becomes(broker: &Broker, wanted: impl Fn(&pb::Pool) -> bool) -> bool {
    let mut op = broker.operator(&broker.creds.operator).await;
    for _ in 0..500 {
        let near = op
            .get_pool(pb::GetPoolRequest {
                name: "pools/near".into(),
            })
            .await
            .unwrap()
            .into_inner();
        if wanted(&near) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

#[tokio::test]
async fn an_agent_runs_its_pools_leases_and_a_silent_agent_loses_its_pool() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.agent_pools = vec!["near".into()];
    config.heartbeat_timeout = Duration::from_millis(300);
    let broker = Broker::start(config).await;
    let agent_token = broker.creds.agent("near").expect("agent token").to_string();
    let tenant_token = broker.tenant_token("tenant-a");

    // Another pool's agent may not speak for this one.
    let (tx, rx) = mpsc::channel(16);
    tx.send(hello(vec![])).await.unwrap();
    let mut wrong = broker.pool(&broker.tenant_token("tenant-b")).await;
    let e = wrong
        .connect_agent(ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);

    let mut pool = broker.pool(&agent_token).await;
    let (tx, mut from_broker) = connect(&mut pool).await;
    let alive = keep_alive(tx.clone());

    // Only `near` has h100: the lease goes to the agent, and waits for its report.
    let mut tenant = broker.tenant(&tenant_token).await;
    let spec = one_h100_node();
    let submit = |id: &str| pb::SubmitRequestRequest {
        request_id: id.into(),
        spec: Some(spec.clone()),
    };
    let r = tenant
        .submit_request(submit("a1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.state, pb::RequestState::Placed as i32);
    let pb::broker_message::Body::StartLease(start) = next(&mut from_broker).await else {
        panic!("expected StartLease")
    };
    assert_eq!(start.request, r.id);
    assert_eq!(start.parts.len(), 1);
    tx.send(report(r.id, pb::LeaseReportKind::Started))
        .await
        .unwrap();
    expect_ack(&mut from_broker, r.id, pb::LeaseReportKind::Started).await;
    eventually(&broker, &tenant_token, &r.name, pb::RequestState::Running).await;
    // A repeated report is acknowledged again and changes nothing.
    tx.send(report(r.id, pb::LeaseReportKind::Started))
        .await
        .unwrap();
    expect_ack(&mut from_broker, r.id, pb::LeaseReportKind::Started).await;
    tx.send(report(r.id, pb::LeaseReportKind::Finished))
        .await
        .unwrap();
    expect_ack(&mut from_broker, r.id, pb::LeaseReportKind::Finished).await;
    let done = eventually(&broker, &tenant_token, &r.name, pb::RequestState::Completed).await;
    assert_eq!(done.end_reason, pb::EndReason::Finished as i32);
    // A report for a lease that has ended is stale: acknowledged, not applied.
    tx.send(report(r.id, pb::LeaseReportKind::Failed))
        .await
        .unwrap();
    expect_ack(&mut from_broker, r.id, pb::LeaseReportKind::Failed).await;
    let still = eventually(&broker, &tenant_token, &r.name, pb::RequestState::Completed).await;
    assert_eq!(still.end_reason, pb::EndReason::Finished as i32);

    // A second lease, then the agent falls silent: the pool is lost, the lease requeued.
    let r2 = tenant
        .submit_request(submit("a2"))
        .await
        .unwrap()
        .into_inner();
    let pb::broker_message::Body::StartLease(start) = next(&mut from_broker).await else {
        panic!("expected StartLease")
    };
    assert_eq!(start.request, r2.id);
    alive.abort();
    drop(tx);
    drop(from_broker);
    let queued = eventually(&broker, &tenant_token, &r2.name, pb::RequestState::Queued).await;
    assert!(queued.lease.is_none(), "a queued request holds nothing");
    // The pool views are republished after the batch that lost the pool: they may trail the
    // request's record by a moment.
    assert!(
        near_becomes(&broker, |p| p.health == pb::PoolHealth::Lost as i32).await,
        "the silent agent's pool is lost"
    );

    // The agent comes back: the pool is restored and the requeued lease is started again.
    let (tx, mut from_broker) = connect(&mut pool).await;
    let alive = keep_alive(tx.clone());
    let pb::broker_message::Body::StartLease(again) = next(&mut from_broker).await else {
        panic!("expected StartLease")
    };
    assert_eq!(again.request, r2.id);
    assert!(
        near_becomes(&broker, |p| p.health == pb::PoolHealth::Healthy as i32).await,
        "the pool is restored"
    );
    alive.abort();
    drop(tx);
    broker.stop().await;
}

fn node_health(group: u32, node: u32, healthy: bool) -> pb::AgentMessage {
    pb::AgentMessage {
        body: Some(pb::agent_message::Body::Heartbeat(pb::Heartbeat {
            time_unix_ms: 0,
            nodes: vec![pb::NodeHealth {
                group,
                node,
                healthy,
            }],
        })),
    }
}

#[tokio::test]
async fn a_node_the_agent_reports_down_loses_its_lease_until_it_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.agent_pools = vec!["near".into()];
    let broker = Broker::start(config).await;
    let agent_token = broker.creds.agent("near").expect("agent token").to_string();
    let tenant_token = broker.tenant_token("tenant-a");
    let mut pool = broker.pool(&agent_token).await;
    let (tx, mut from_broker) = connect(&mut pool).await;
    let alive = keep_alive(tx.clone());

    let mut tenant = broker.tenant(&tenant_token).await;
    let spec = one_h100_node();
    let r = tenant
        .submit_request(pb::SubmitRequestRequest {
            request_id: "n1".into(),
            spec: Some(spec),
        })
        .await
        .unwrap()
        .into_inner();
    let pb::broker_message::Body::StartLease(start) = next(&mut from_broker).await else {
        panic!("expected StartLease")
    };
    let part = start.parts[0].clone();

    // The node fails: the broker stops the lease there and starts it again on the other node.
    tx.send(node_health(part.group, part.node, false))
        .await
        .unwrap();
    let pb::broker_message::Body::StopLease(stop) = next(&mut from_broker).await else {
        panic!("expected StopLease")
    };
    assert_eq!(stop.request, r.id);
    assert_eq!(stop.reason, pb::EndReason::NodeLost as i32);
    let pb::broker_message::Body::StartLease(again) = next(&mut from_broker).await else {
        panic!("expected StartLease")
    };
    assert_eq!(again.request, r.id);
    assert_ne!(again.parts[0].node, part.node, "not on the failed node");

    let unavailable =
        |want: u64| move |p: &pb::Pool| p.utilisation.as_ref().unwrap().unavailable_devices == want;
    assert!(
        near_becomes(&broker, unavailable(8)).await,
        "the failed node's devices are out of service"
    );

    // Back in service: its devices count again.
    tx.send(node_health(part.group, part.node, true))
        .await
        .unwrap();
    assert!(
        near_becomes(&broker, unavailable(0)).await,
        "the node came back into service"
    );
    alive.abort();
    drop(tx);
    broker.stop().await;
}

#[tokio::test]
async fn a_lease_over_two_pools_ends_on_both_when_one_reports_it_done() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.agent_pools = vec!["near".into(), "far".into()];
    config.shutdown_grace = Duration::from_millis(200);
    let broker = Broker::start(config).await;
    let mut near = broker.pool(broker.creds.agent("near").unwrap()).await;
    let mut far = broker.pool(broker.creds.agent("far").unwrap()).await;
    let (near_tx, mut to_near) = connect_as(&mut near, "near").await;
    let (far_tx, mut to_far) = connect_as(&mut far, "far").await;
    let alive = [keep_alive(near_tx.clone()), keep_alive(far_tx.clone())];

    // More than near's 16 H100 hold: the elastic lease takes parts of both pools.
    let mut tenant = broker.tenant(&broker.tenant_token("tenant-a")).await;
    let r = tenant
        .submit_request(pb::SubmitRequestRequest {
            request_id: "both".into(),
            spec: Some(pb::RequestSpec {
                shape: Some(pb::request_spec::Shape::Elastic(pb::ElasticShape {
                    tflops: 18_000,
                    min_chunk_tflops: 0,
                })),
                duration_ms: 3_600_000,
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    for to in [&mut to_near, &mut to_far] {
        let pb::broker_message::Body::StartLease(start) = next(to).await else {
            panic!("expected StartLease")
        };
        assert_eq!(start.request, r.id);
    }
    near_tx
        .send(report(r.id, pb::LeaseReportKind::Finished))
        .await
        .unwrap();
    let pb::broker_message::Body::StopLease(stop) = next(&mut to_far).await else {
        panic!("expected StopLease on the other pool")
    };
    assert_eq!(stop.request, r.id);
    assert_eq!(stop.reason, pb::EndReason::Finished as i32);
    let token = broker.tenant_token("tenant-a");
    eventually(&broker, &token, &r.name, pb::RequestState::Completed).await;
    for a in alive {
        a.abort();
    }
    // The agents keep their streams open: the broker still stops, after its grace period.
    broker.stop().await;
    drop((near_tx, far_tx));
}
