//! The real `suanli` binary, killed with SIGKILL while tenants submit: after a restart every
//! acknowledged request is there exactly once, and the capacity held by leases equals what the
//! fleet reports as allocated. The broker snapshots its state every few dozen log entries, so
//! recovery goes through a snapshot and the log after it.

mod support;

use std::time::Duration;

use suanli_proto::v1 as pb;
use suanli_proto::v1::operator_service_client::OperatorServiceClient;
use suanli_proto::v1::tenant_service_client::TenantServiceClient;
use support::{all_requests, channel, start, wait_for_credentials, with_token};

fn spec(i: u64) -> pb::RequestSpec {
    let shape = if i.is_multiple_of(2) {
        pb::request_spec::Shape::Gang(pb::GangShape {
            nodes: 1 + (i % 3) as u32,
            devices_per_node: 8,
        })
    } else {
        pb::request_spec::Shape::Elastic(pb::ElasticShape {
            tflops: 2_000 + 500 * i,
            min_chunk_tflops: 500,
        })
    };
    pb::RequestSpec {
        shape: Some(shape),
        duration_ms: 3_600_000,
        priority: pb::Priority::Standard as i32,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_requests_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = start(dir.path());
    let creds = wait_for_credentials(dir.path()).await;
    let token = creds.tenant("tenant-a").unwrap().to_string();
    let ch = channel(&addr).await;

    // Four writers submit as fast as they can; the broker is killed while they do.
    let mut writers = Vec::new();
    for w in 0..4u64 {
        let ch = ch.clone();
        let token = token.clone();
        writers.push(tokio::spawn(async move {
            let mut client = TenantServiceClient::new(ch);
            let mut acked = Vec::new();
            for i in 0.. {
                let req = pb::SubmitRequestRequest {
                    request_id: format!("w{w}-{i}"),
                    spec: Some(spec(i)),
                };
                match client.submit_request(with_token(req, &token)).await {
                    Ok(r) => acked.push((format!("w{w}-{i}"), r.into_inner().id)),
                    Err(_) => break,
                }
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    child.kill();
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await.unwrap());
    }
    assert!(
        acked.len() > 10,
        "only {} submissions were acknowledged before the kill",
        acked.len()
    );

    let (mut child, addr) = start(dir.path());
    wait_for_credentials(dir.path()).await;
    let ch = channel(&addr).await;
    let mut tenant = TenantServiceClient::new(ch.clone());
    let all = all_requests(&mut tenant, &token).await;
    for (key, id) in &acked {
        let found = all.iter().filter(|r| r.id == *id).count();
        assert_eq!(
            found, 1,
            "acknowledged request {key} (id {id}) found {found} times"
        );
    }
    let mut ids: Vec<u64> = all.iter().map(|r| r.id).collect();
    ids.dedup();
    assert_eq!(ids.len(), all.len(), "no request is listed twice");
    // Resubmitting an acknowledged key returns the same request, not a new one.
    let (key, id) = &acked[0];
    let again = pb::SubmitRequestRequest {
        request_id: key.clone(),
        spec: Some(spec(0)),
    };
    let again = tenant
        .submit_request(with_token(again, &token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.id, *id);
    // Capacity is conserved: what live leases hold is what the fleet counts as allocated.
    let live: u64 = all
        .iter()
        .filter(|r| r.end_reason == pb::EndReason::Unspecified as i32)
        .filter_map(|r| r.lease.as_ref().map(|l| l.tflops))
        .sum();
    let mut operator = OperatorServiceClient::new(ch);
    let summary = operator
        .get_fleet_summary(with_token(pb::GetFleetSummaryRequest {}, &creds.operator))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(summary.total.unwrap().allocated_tflops, live);
    child.kill();
}
