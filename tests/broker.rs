//! The broker over a real socket: request lifecycles, idempotency, watch, quote, every auth
//! rule, validation, and recovery from the command log.

use std::time::Duration;

use suanli_broker::store::Store;
use suanli_e2e::{Broker, gang, submit, test_config};
use suanli_proto::v1 as pb;
use tokio_stream::StreamExt;
use tonic::Code;

fn state(r: &pb::Request) -> pb::RequestState {
    pb::RequestState::try_from(r.state).unwrap()
}

#[tokio::test]
async fn a_gang_request_lives_its_whole_life() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(test_config(dir.path())).await;
    let mut a = broker.tenant(&broker.tenant_token("tenant-a")).await;
    let r = a
        .submit_request(submit("g1", gang(2, 8, "h100", 3_600_000)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.name, format!("tenants/tenant-a/requests/{}", r.id));
    // Simulated execution starts it in the same batch as its placement.
    assert_eq!(state(&r), pb::RequestState::Running);
    let lease = r.lease.clone().unwrap();
    assert_eq!(lease.parts.len(), 2);
    assert!(
        lease
            .parts
            .iter()
            .all(|p| p.pool == "near" && p.devices == 8)
    );
    let got = a
        .get_request(pb::GetRequestRequest {
            name: r.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.id, r.id);
    let list = a
        .list_requests(pb::ListRequestsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.requests.len(), 1);
    let done = a
        .release_request(pb::ReleaseRequestRequest {
            request_id: "rel1".into(),
            name: r.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&done), pb::RequestState::Completed);
    assert_eq!(done.end_reason, pb::EndReason::Released as i32);
    assert!(
        done.lease.is_some(),
        "an ended request keeps its last lease"
    );
    let again = a
        .release_request(pb::ReleaseRequestRequest {
            request_id: "rel2".into(),
            name: r.name.clone(),
        })
        .await;
    assert_eq!(
        again.unwrap_err().code(),
        Code::FailedPrecondition,
        "an ended request cannot be released"
    );
    broker.stop().await;
}

#[tokio::test]
async fn an_elastic_request_splits_and_a_short_lease_completes_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(test_config(dir.path())).await;
    let mut a = broker.tenant(&broker.tenant_token("tenant-a")).await;
    let spec = pb::RequestSpec {
        shape: Some(pb::request_spec::Shape::Elastic(pb::ElasticShape {
            tflops: 18000,
            min_chunk_tflops: 1000,
        })),
        duration_ms: 300,
        ..Default::default()
    };
    let r = a
        .submit_request(submit("e1", spec))
        .await
        .unwrap()
        .into_inner();
    let lease = r.lease.unwrap();
    assert!(lease.tflops >= 18000);
    let pools: std::collections::BTreeSet<_> = lease.parts.iter().map(|p| p.pool.clone()).collect();
    assert_eq!(
        pools.len(),
        2,
        "the cheaper h100 pool (15,824 TFLOPS) is too small alone: {pools:?}"
    );
    // 300 ms later the simulated lease finishes.
    let mut ended = None;
    for _ in 0..200 {
        let got = a
            .get_request(pb::GetRequestRequest {
                name: r.name.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        if got.end_reason != pb::EndReason::Unspecified as i32 {
            ended = Some(got);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ended = ended.expect("the lease ended");
    assert_eq!(state(&ended), pb::RequestState::Completed);
    broker.stop().await;
}

#[tokio::test]
async fn resubmitting_with_the_same_request_id_returns_the_first_request() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(test_config(dir.path())).await;
    let mut a = broker.tenant(&broker.tenant_token("tenant-a")).await;
    let first = a
        .submit_request(submit("same", gang(1, 8, "h100", 60_000)))
        .await
        .unwrap()
        .into_inner();
    let second = a
        .submit_request(submit("same", gang(1, 8, "h100", 60_000)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.id, second.id);
    let third = a
        .submit_request(submit("other", gang(1, 8, "h100", 60_000)))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(first.id, third.id);
    // Another tenant's key space is its own.
    let mut b = broker.tenant(&broker.tenant_token("tenant-b")).await;
    let theirs = b
        .submit_request(submit("same", gang(1, 8, "a800", 60_000)))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(theirs.id, first.id);
    let list = a
        .list_requests(pb::ListRequestsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.requests.len(), 2);
    broker.stop().await;
}

#[tokio::test]
async fn watch_streams_the_changes_of_ones_own_requests() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(test_config(dir.path())).await;
    let mut a = broker.tenant(&broker.tenant_token("tenant-a")).await;
    let mut stream = a
        .watch_requests(pb::WatchRequestsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut b = broker.tenant(&broker.tenant_token("tenant-b")).await;
    b.submit_request(submit("b1", gang(1, 8, "a800", 60_000)))
        .await
        .unwrap();
    let r = a
        .submit_request(submit("w1", gang(1, 8, "h100", 60_000)))
        .await
        .unwrap()
        .into_inner();
    a.cancel_request(pb::CancelRequestRequest {
        request_id: "c1".into(),
        name: r.name.clone(),
    })
    .await
    .unwrap();
    let mut kinds = Vec::new();
    while kinds.len() < 4 {
        let ev = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let req = ev.request.unwrap();
        assert_eq!(req.tenant, "tenant-a", "no event of another tenant");
        kinds.push(pb::RequestEventKind::try_from(ev.kind).unwrap());
    }
    use pb::RequestEventKind::*;
    assert_eq!(kinds, [Submitted, Placed, Started, Ended]);
    broker.stop().await;
}

#[tokio::test]
async fn quote_tells_the_price_without_placing() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(test_config(dir.path())).await;
    let mut a = broker.tenant(&broker.tenant_token("tenant-a")).await;
    let q = a
        .quote_request(pb::QuoteRequestRequest {
            spec: Some(gang(1, 8, "h100", 3_600_000)),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(q.placeable_now);
    assert_eq!(q.pools, ["near"]);
    assert_eq!(q.price_fen_per_hour, 8 * 3000);
    assert_eq!(q.estimated_cost_fen, 8 * 3000);
    let list = a
        .list_requests(pb::ListRequestsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(list.requests.is_empty(), "a quote submits nothing");
    let q = a
        .quote_request(pb::QuoteRequestRequest {
            spec: Some(gang(3, 8, "h100", 60_000)),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!q.placeable_now);
    assert_eq!(q.wait_reason, pb::WaitReason::NoMatchingPool as i32);
    broker.stop().await;
}

#[tokio::test]
async fn every_auth_rule_holds() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(test_config(dir.path())).await;
    // No token and a wrong token: UNAUTHENTICATED, on every service.
    for token in ["", "not-a-token"] {
        let mut t = broker.tenant(token).await;
        let e = t
            .list_requests(pb::ListRequestsRequest::default())
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{token:?}");
        let mut o = broker.operator(token).await;
        assert_eq!(
            o.get_fleet_summary(pb::GetFleetSummaryRequest {})
                .await
                .unwrap_err()
                .code(),
            Code::Unauthenticated
        );
        let mut p = broker.pool(token).await;
        let e = p
            .register_pool(pb::RegisterPoolRequest::default())
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
    }
    let mut a = broker.tenant(&broker.tenant_token("tenant-a")).await;
    let r = a
        .submit_request(submit("x", gang(1, 8, "h100", 60_000)))
        .await
        .unwrap()
        .into_inner();
    // A tenant sees and changes only its own requests.
    let mut b = broker.tenant(&broker.tenant_token("tenant-b")).await;
    let e = b
        .get_request(pb::GetRequestRequest {
            name: r.name.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = b
        .cancel_request(pb::CancelRequestRequest {
            request_id: String::new(),
            name: r.name.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = b
        .release_request(pb::ReleaseRequestRequest {
            request_id: String::new(),
            name: r.name.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let forged = r.name.replace("tenant-a", "tenant-b");
    assert_eq!(
        b.get_request(pb::GetRequestRequest { name: forged })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    // A tenant may not call operator or pool services.
    let tenant_token = broker.tenant_token("tenant-a");
    let mut o = broker.operator(&tenant_token).await;
    assert_eq!(
        o.get_fleet_summary(pb::GetFleetSummaryRequest {})
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    let e = o
        .drain_pool(pb::DrainPoolRequest {
            request_id: String::new(),
            name: "pools/near".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let mut p = broker.pool(&tenant_token).await;
    let pool = pb::Pool {
        id: "near".into(),
        kind: pb::PoolKind::LocalCentre as i32,
        ..Default::default()
    };
    let e = p
        .register_pool(pb::RegisterPoolRequest {
            request_id: String::new(),
            pool: Some(pool),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // The operator may not submit as a tenant.
    let mut as_operator = broker.tenant(&broker.creds.operator).await;
    let e = as_operator
        .submit_request(submit("o", gang(1, 8, "h100", 60_000)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // The operator drains and undrains.
    let mut op = broker.operator(&broker.creds.operator).await;
    let p = op
        .drain_pool(pb::DrainPoolRequest {
            request_id: "d".into(),
            name: "pools/far".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.health, pb::PoolHealth::Draining as i32);
    let p = op
        .undrain_pool(pb::UndrainPoolRequest {
            request_id: "u".into(),
            name: "pools/far".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.health, pb::PoolHealth::Healthy as i32);
    broker.stop().await;
}

#[tokio::test]
async fn invalid_fields_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(test_config(dir.path())).await;
    let mut a = broker.tenant(&broker.tenant_token("tenant-a")).await;
    let cases = [
        (
            pb::SubmitRequestRequest {
                request_id: String::new(),
                spec: None,
            },
            "field spec: required",
        ),
        (
            submit(
                "",
                pb::RequestSpec {
                    duration_ms: 5,
                    ..Default::default()
                },
            ),
            "field spec.shape",
        ),
        (
            submit("", gang(1, 8, "h999", 60_000)),
            "constraints.models[0]",
        ),
        (submit("", gang(0, 8, "h100", 60_000)), "shape.nodes"),
        (submit("", gang(1, 8, "h100", 0)), "duration_ms"),
        (
            submit(&"k".repeat(200), gang(1, 8, "h100", 60_000)),
            "request_id",
        ),
    ];
    for (req, field) in cases {
        let e = a.submit_request(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
        assert!(
            e.message().contains(field),
            "{} should name {field}",
            e.message()
        );
    }
    let e = a
        .get_request(pb::GetRequestRequest {
            name: "requests/1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    broker.stop().await;
}

#[tokio::test]
async fn a_restarted_broker_recovers_the_same_state() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(test_config(dir.path())).await;
    let mut a = broker.tenant(&broker.tenant_token("tenant-a")).await;
    let mut names = Vec::new();
    for i in 0..6 {
        let r = a
            .submit_request(submit(&format!("r{i}"), gang(1, 8, "h100", 3_600_000)))
            .await
            .unwrap()
            .into_inner();
        names.push(r.name);
    }
    let token = broker.tenant_token("tenant-a");
    let digest = broker.stop().await;
    assert_eq!(
        suanli_broker::recovered_digest(&test_config(dir.path())).unwrap(),
        digest
    );
    let broker = Broker::start(test_config(dir.path())).await;
    assert_eq!(
        broker.tenant_token("tenant-a"),
        token,
        "tokens survive a restart"
    );
    let mut a = broker.tenant(&token).await;
    let list = a
        .list_requests(pb::ListRequestsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        list.requests
            .iter()
            .map(|r| r.name.clone())
            .collect::<Vec<_>>(),
        names
    );
    // Resubmitting after the restart is still idempotent.
    let again = a
        .submit_request(submit("r0", gang(1, 8, "h100", 3_600_000)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.name, names[0]);
    broker.stop().await;
}

#[tokio::test]
async fn a_waiting_request_says_why_and_when_it_may_start() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(test_config(dir.path())).await;
    let mut a = broker.tenant(&broker.tenant_token("tenant-a")).await;
    let held = a
        .submit_request(submit("hold", gang(2, 8, "h100", 3_600_000)))
        .await
        .unwrap()
        .into_inner();
    let end = held.lease.unwrap().end_unix_ms;
    let waiting = a
        .submit_request(submit("wait", gang(2, 8, "h100", 60_000)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&waiting), pb::RequestState::Queued);
    let mut wait = None;
    for _ in 0..500 {
        let r = a
            .get_request(pb::GetRequestRequest {
                name: waiting.name.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        let w = r.wait.unwrap();
        if w.earliest_start_unix_ms.is_some() {
            wait = Some(w);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let wait = wait.expect("the reserved head gets an estimated start");
    assert_eq!(wait.reason, pb::WaitReason::CapacityBusy as i32);
    assert_eq!(wait.position, 1);
    assert_eq!(
        wait.earliest_start_unix_ms,
        Some(end),
        "when the held lease ends"
    );
    let mut op = broker.operator(&broker.creds.operator).await;
    let queue = op
        .list_queue(pb::ListQueueRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        queue.requests.iter().map(|r| r.id).collect::<Vec<_>>(),
        [waiting.id]
    );
    broker.stop().await;
}

#[tokio::test]
async fn recovery_starts_from_the_latest_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.snapshot_every = 5;
    let broker = Broker::start(config.clone()).await;
    let mut a = broker.tenant(&broker.tenant_token("tenant-a")).await;
    let mut names = Vec::new();
    for i in 0..12 {
        let r = a
            .submit_request(submit(&format!("s{i}"), gang(1, 8, "h100", 3_600_000)))
            .await
            .unwrap()
            .into_inner();
        names.push(r.name);
    }
    let token = broker.tenant_token("tenant-a");
    let digest = broker.stop().await;

    let store = suanli_broker::store::RedbStore::open(dir.path()).unwrap();
    let recovered = store.recover().unwrap();
    let (at, _) = recovered.snapshot.expect("a snapshot was saved");
    assert!(at >= 5, "snapshot at log index {at}");
    assert_eq!(
        store.next_index() - at,
        recovered.entries.len() as u64,
        "the log before the snapshot is dropped; the entries after it are kept"
    );
    drop(store);
    assert_eq!(
        suanli_broker::recovered_digest(&config).unwrap(),
        digest,
        "snapshot + log tail give the state the broker stopped with"
    );

    let broker = Broker::start(config).await;
    assert_eq!(broker.tenant_token("tenant-a"), token);
    let mut a = broker.tenant(&token).await;
    let list = a
        .list_requests(pb::ListRequestsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let listed: Vec<String> = list.requests.iter().map(|r| r.name.clone()).collect();
    assert_eq!(listed, names);
    let again = a
        .submit_request(submit("s0", gang(1, 8, "h100", 3_600_000)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.name, names[0], "request_ids survive in the snapshot");
    broker.stop().await;
}

#[tokio::test]
async fn ended_requests_are_forgotten_beyond_the_most_kept() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.ended_max = 2;
    let broker = Broker::start(config).await;
    let mut a = broker.tenant(&broker.tenant_token("tenant-a")).await;
    let mut names = Vec::new();
    for i in 0..4 {
        let r = a
            .submit_request(submit(&format!("e{i}"), gang(1, 8, "h100", 3_600_000)))
            .await
            .unwrap()
            .into_inner();
        a.release_request(pb::ReleaseRequestRequest {
            name: r.name.clone(),
            request_id: format!("e{i}-release"),
        })
        .await
        .unwrap();
        names.push(r.name);
    }
    let live = a
        .submit_request(submit("live", gang(1, 8, "h100", 3_600_000)))
        .await
        .unwrap()
        .into_inner();
    let get = |name: &str| pb::GetRequestRequest { name: name.into() };
    let gone = a.get_request(get(&names[0])).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");
    assert_eq!(
        a.get_request(get(&names[1])).await.unwrap_err().code(),
        Code::NotFound
    );
    let kept = a.get_request(get(&names[3])).await.unwrap().into_inner();
    assert_eq!(state(&kept), pb::RequestState::Completed);
    let list = a
        .list_requests(pb::ListRequestsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let listed: Vec<String> = list.requests.iter().map(|r| r.name.clone()).collect();
    assert_eq!(listed, [names[2].clone(), names[3].clone(), live.name]);
    broker.stop().await;
}

#[tokio::test]
async fn requests_behind_the_head_get_estimated_starts_too() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(test_config(dir.path())).await;
    let mut a = broker.tenant(&broker.tenant_token("tenant-a")).await;
    let held = a
        .submit_request(submit("hold", gang(2, 8, "h100", 3_600_000)))
        .await
        .unwrap()
        .into_inner();
    let end = held.lease.unwrap().end_unix_ms;
    let first = a
        .submit_request(submit("first", gang(2, 8, "h100", 60_000)))
        .await
        .unwrap()
        .into_inner();
    let second = a
        .submit_request(submit("second", gang(2, 8, "h100", 60_000)))
        .await
        .unwrap()
        .into_inner();
    let mut estimate = None;
    for _ in 0..500 {
        let r = a
            .get_request(pb::GetRequestRequest {
                name: second.name.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        if let Some(at) = r.wait.unwrap().earliest_start_unix_ms {
            estimate = Some(at);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        estimate,
        Some(end + 60_000),
        "after the held lease ends and the first request has run ({})",
        first.name
    );
    broker.stop().await;
}

#[tokio::test]
async fn a_tenant_sees_its_own_quota_and_usage_and_no_one_elses() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(test_config(dir.path())).await;
    let mut a = broker.tenant(&broker.tenant_token("tenant-a")).await;
    let r = a
        .submit_request(submit("me1", gang(1, 8, "h100", 3_600_000)))
        .await
        .unwrap()
        .into_inner();
    let mut me = None;
    for _ in 0..500 {
        let t = a
            .get_tenant(pb::GetTenantRequest::default())
            .await
            .unwrap()
            .into_inner();
        if t.usage.as_ref().is_some_and(|u| u.live_leases == 1) {
            me = Some(t);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let me = me.expect("the lease shows in the tenant's usage");
    assert_eq!(me.name, "tenants/tenant-a");
    assert_eq!(
        me.usage.unwrap().used_tflops,
        r.lease.unwrap().tflops,
        "usage is what its lease holds"
    );
    let named = a
        .get_tenant(pb::GetTenantRequest {
            name: "tenants/tenant-a".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(named.id, "tenant-a");
    let other = a
        .get_tenant(pb::GetTenantRequest {
            name: "tenants/tenant-b".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::NotFound);
    let mut op = broker.tenant(&broker.creds.operator).await;
    let denied = op
        .get_tenant(pb::GetTenantRequest::default())
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    broker.stop().await;
}

#[tokio::test]
async fn a_request_no_pool_could_ever_hold_is_refused_unless_it_waits_for_pools() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(test_config(dir.path())).await;
    let mut a = broker.tenant(&broker.tenant_token("tenant-a")).await;
    // The small fleet: 2 nodes of 8 h100 and 2 of 8 a800, 20.816P in all.
    let refused = |spec: pb::RequestSpec| {
        let mut a = a.clone();
        async move {
            let e = a.submit_request(submit("", spec)).await.unwrap_err();
            assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
            e.message().to_string()
        }
    };
    assert_eq!(
        refused(gang(1_000_000, 8, "h100", 60_000)).await,
        "no registered pool could ever hold this request: no node group of h100 has 1000000 \
         nodes of 8 devices; the largest has 2; the fleet holds 20.816P"
    );
    assert!(
        refused(gang(1, 16, "a800", 60_000))
            .await
            .contains("no node of a800 has 16 devices; the largest have 8")
    );
    let elastic = pb::RequestSpec {
        shape: Some(pb::request_spec::Shape::Elastic(pb::ElasticShape {
            tflops: 1_000_000,
            min_chunk_tflops: 0,
        })),
        duration_ms: 60_000,
        ..Default::default()
    };
    assert!(
        refused(elastic)
            .await
            .contains("1,000P asked, but the fleet holds 20.816P")
    );
    // Three nodes of h100: refused, unless it waits for pools that may register later.
    assert!(
        refused(gang(3, 8, "h100", 60_000))
            .await
            .contains("the largest has 2")
    );
    let waits = a
        .submit_request(submit(
            "w",
            pb::RequestSpec {
                wait_for_pools: true,
                ..gang(3, 8, "h100", 60_000)
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&waits), pb::RequestState::Queued);
    assert_eq!(
        waits.wait.unwrap().reason,
        pb::WaitReason::NoMatchingPool as i32
    );
    // A refusal leaves nothing behind.
    let listed = a
        .list_requests(pb::ListRequestsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .requests;
    assert_eq!(listed.len(), 1, "{listed:?}");
    broker.stop().await;
}

/// Calls `$method` on `$client` with `$first` (a first call and its retry, both OK, with the
/// same answer), then with `$other`, another call under the same request_id: INVALID_ARGUMENT
/// naming it. Evaluates to the first answer and the retry's.
macro_rules! reuse_is_refused {
    ($client:expr, $method:ident, $first:expr, $other:expr) => {{
        let name = stringify!($method);
        let mut client = $client.clone();
        let first = client
            .$method($first)
            .await
            .unwrap_or_else(|e| panic!("{name}: first call: {e:?}"))
            .into_inner();
        let again = client
            .$method($first)
            .await
            .unwrap_or_else(|e| panic!("{name}: retry: {e:?}"))
            .into_inner();
        assert_eq!(first, again, "{name}: a retry gets the first answer");
        let e =
            client.$method($other).await.err().unwrap_or_else(|| {
                panic!("{name}: another call under the same request_id was taken")
            });
        assert_eq!(e.code(), Code::InvalidArgument, "{name}: {e:?}");
        assert!(
            e.message().contains("field request_id") && e.message().contains("different call"),
            "{name}: {}",
            e.message()
        );
        (first, again)
    }};
}

#[tokio::test]
async fn every_mutating_call_refuses_a_request_id_reused_for_another_call() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(test_config(dir.path())).await;
    let a = broker.tenant(&broker.tenant_token("tenant-a")).await;
    let op = broker.operator(&broker.creds.operator).await;
    let pools = broker.pool(&broker.creds.operator).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;

    let (first, again) = reuse_is_refused!(
        a,
        submit_request,
        submit("k-submit", gang(1, 8, "h100", 3_600_000)),
        submit("k-submit", gang(1, 8, "a800", 3_600_000))
    );
    assert_eq!(first.id, again.id, "a retry answers the first request");
    let placed = |spec| {
        let mut a = a.clone();
        async move {
            a.submit_request(submit("", spec))
                .await
                .unwrap()
                .into_inner()
                .name
        }
    };
    let (r1, r2) = (
        placed(gang(1, 8, "h100", 3_600_000)).await,
        placed(gang(1, 8, "a800", 3_600_000)).await,
    );
    let (r3, r4) = (
        placed(gang(1, 8, "a800", 3_600_000)).await,
        placed(gang(1, 8, "a800", 3_600_000)).await,
    );
    let end = |request_id: &str, name: &str| pb::CancelRequestRequest {
        request_id: request_id.into(),
        name: name.into(),
    };
    reuse_is_refused!(
        a,
        cancel_request,
        end("k-cancel", &r1),
        end("k-cancel", &r2)
    );
    let release = |name: &str| pb::ReleaseRequestRequest {
        request_id: "k-release".into(),
        name: name.into(),
    };
    reuse_is_refused!(a, release_request, release(&r3), release(&r4));

    let drain = |request_id: &str, pool: &str| pb::DrainPoolRequest {
        request_id: request_id.into(),
        name: format!("pools/{pool}"),
    };
    reuse_is_refused!(
        op,
        drain_pool,
        drain("k-drain", "near"),
        drain("k-drain", "far")
    );
    let undrain = |pool: &str| pb::UndrainPoolRequest {
        request_id: "k-undrain".into(),
        name: format!("pools/{pool}"),
    };
    reuse_is_refused!(op, undrain_pool, undrain("near"), undrain("far"));
    // The same request_id for another method is another call too.
    let e = op
        .clone()
        .undrain_pool(pb::UndrainPoolRequest {
            request_id: "k-drain".into(),
            name: "pools/near".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    let tenant = |weight| pb::SetTenantRequest {
        request_id: "k-tenant".into(),
        tenant: Some(pb::Tenant {
            id: "tenant-d".into(),
            quota_tflops: 500_000,
            weight,
            ..Default::default()
        }),
        rotate_credential: false,
    };
    reuse_is_refused!(op, set_tenant, tenant(1), tenant(2));
    let voucher = |face_value_fen| pb::IssueVoucherRequest {
        request_id: "k-voucher".into(),
        voucher: Some(pb::VoucherSpec {
            id: "FT-K-1".into(),
            tenant: "tenant-a".into(),
            face_value_fen,
            rate_bp: 5_000,
            per_lease_cap_fen: None,
            scope: Some(pb::VoucherScope {
                pool_kinds: vec![pb::PoolKind::LocalCentre as i32],
                ..Default::default()
            }),
            valid_from_unix_ms: now - 3_600_000,
            valid_until_unix_ms: now + 30 * 24 * 3_600_000,
        }),
    };
    let (first_voucher, _) = reuse_is_refused!(op, issue_voucher, voucher(100), voucher(200));
    let budget = |limit_fen| pb::SetBudgetRequest {
        request_id: "k-budget".into(),
        tenant: "tenant-c".into(),
        budget: Some(pb::Budget {
            limit_fen,
            period: pb::BudgetPeriod::Monthly as i32,
        }),
    };
    let (first_budget, _) = reuse_is_refused!(op, set_budget, budget(30_000), budget(40_000));
    let subsidy = |monthly_fen| pb::SetSubsidyBudgetRequest {
        request_id: "k-subsidy".into(),
        monthly_fen: Some(monthly_fen),
    };
    let (first_subsidy, _) =
        reuse_is_refused!(op, set_subsidy_budget, subsidy(100_000), subsidy(200_000));
    // Changed since by other calls: a retry still gets the first answer, not a new read.
    let mut o = op.clone();
    o.set_budget(pb::SetBudgetRequest {
        request_id: "k-budget-later".into(),
        ..budget(50_000)
    })
    .await
    .unwrap();
    o.set_subsidy_budget(pb::SetSubsidyBudgetRequest {
        request_id: "k-subsidy-later".into(),
        monthly_fen: Some(300_000),
    })
    .await
    .unwrap();
    assert_eq!(
        o.set_budget(budget(30_000)).await.unwrap().into_inner(),
        first_budget
    );
    assert_eq!(
        o.set_subsidy_budget(subsidy(100_000))
            .await
            .unwrap()
            .into_inner(),
        first_subsidy
    );
    // Found as a new user would: the same request_id for another tenant's adjustment was
    // INTERNAL ("the adjustment is not in the ledger").
    let adjust = |tenant: &str| pb::AdjustBalanceRequest {
        request_id: "k-adjust".into(),
        tenant: tenant.into(),
        amount_fen: -5_000,
        reason: "SLA credit: pool outage".into(),
    };
    let (first_adjust, _) =
        reuse_is_refused!(op, adjust_balance, adjust("tenant-a"), adjust("tenant-b"));
    let far = op
        .clone()
        .get_pool(pb::GetPoolRequest {
            name: "pools/far".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let register = |rtt_ms| pb::RegisterPoolRequest {
        request_id: "k-register".into(),
        pool: Some(pb::Pool {
            id: "extra".into(),
            rtt_ms,
            ..far.clone()
        }),
    };
    reuse_is_refused!(pools, register_pool, register(30), register(40));

    // What each call asked is in the log: after a restart a retry is still a retry, and
    // another call under its request_id is still refused.
    broker.stop().await;
    let broker = Broker::start(test_config(dir.path())).await;
    let mut a = broker.tenant(&broker.tenant_token("tenant-a")).await;
    let again = a
        .submit_request(submit("k-submit", gang(1, 8, "h100", 3_600_000)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.id, first_submitted_id(&broker).await);
    let e = a
        .submit_request(submit("k-submit", gang(1, 8, "a800", 3_600_000)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // The operator's retries get their first answers too, from what the log holds.
    let mut op = broker.operator(&broker.creds.operator).await;
    assert_eq!(
        op.issue_voucher(voucher(100)).await.unwrap().into_inner(),
        first_voucher
    );
    assert_eq!(
        op.set_budget(budget(30_000)).await.unwrap().into_inner(),
        first_budget
    );
    assert_eq!(
        op.adjust_balance(adjust("tenant-a"))
            .await
            .unwrap()
            .into_inner(),
        first_adjust
    );
    broker.stop().await;
}

/// The id of tenant-a's first request.
async fn first_submitted_id(broker: &Broker) -> u64 {
    let mut a = broker.tenant(&broker.tenant_token("tenant-a")).await;
    a.list_requests(pb::ListRequestsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .requests
        .iter()
        .map(|r| r.id)
        .min()
        .expect("a request")
}

/// Calls that log no command (a quote, a refused cancel, a submission a budget refuses) leave
/// the engine as replaying the log leaves it: the digest at a checkpoint after each is the one
/// a restart replaying the log records there.
#[tokio::test]
async fn calls_that_log_no_command_leave_the_engine_as_replay_does() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    // No tick in between to bring the state back in line by itself.
    config.tick_interval = Duration::from_secs(3600);
    let broker = Broker::start(config.clone()).await;
    let mut op = broker.operator(&broker.creds.operator).await;
    let mut a = broker.tenant(&broker.tenant_token("tenant-a")).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let voucher = |id: &str| pb::IssueVoucherRequest {
        voucher: Some(pb::VoucherSpec {
            id: id.into(),
            tenant: "tenant-a".into(),
            face_value_fen: 100_000,
            rate_bp: 5_000,
            per_lease_cap_fen: None,
            scope: Some(pb::VoucherScope {
                pools: vec!["near".into()],
                ..Default::default()
            }),
            valid_from_unix_ms: now - 3_600_000,
            valid_until_unix_ms: now + 30 * 24 * 3_600_000,
        }),
        request_id: String::new(),
    };
    let mut live = Vec::new();
    let checkpoint = async |op: &mut pb::operator_service_client::OperatorServiceClient<_>| {
        let c = op
            .checkpoint(pb::CheckpointRequest {})
            .await
            .unwrap()
            .into_inner();
        (c.log_index, c.digest)
    };
    // A quote after a voucher was issued.
    op.issue_voucher(voucher("V1")).await.unwrap();
    a.quote_request(pb::QuoteRequestRequest {
        spec: Some(gang(1, 8, "h100", 60_000)),
    })
    .await
    .unwrap();
    live.push(checkpoint(&mut op).await);
    // A refused cancel after another.
    op.issue_voucher(voucher("V2")).await.unwrap();
    let r = a
        .submit_request(submit("one", gang(1, 8, "h100", 3_600_000)))
        .await
        .unwrap()
        .into_inner();
    a.cancel_request(pb::CancelRequestRequest {
        request_id: String::new(),
        name: r.name.clone(),
    })
    .await
    .unwrap();
    op.issue_voucher(voucher("V3")).await.unwrap();
    let e = a
        .cancel_request(pb::CancelRequestRequest {
            request_id: String::new(),
            name: r.name,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    live.push(checkpoint(&mut op).await);
    // A submission a budget refuses, after another voucher.
    op.set_budget(pb::SetBudgetRequest {
        tenant: "tenant-a".into(),
        budget: Some(pb::Budget {
            limit_fen: 1,
            period: pb::BudgetPeriod::Total as i32,
        }),
        request_id: String::new(),
    })
    .await
    .unwrap();
    op.issue_voucher(voucher("V4")).await.unwrap();
    let e = a
        .submit_request(submit("two", gang(1, 8, "h100", 3_600_000)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    live.push(checkpoint(&mut op).await);

    drop((op, a));
    broker.stop().await;
    let broker = Broker::start(config).await;
    let mut op = broker.operator(&broker.creds.operator).await;
    let replayed = op
        .get_replica_status(pb::GetReplicaStatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .checkpoints;
    for (index, digest) in live {
        let again = replayed
            .iter()
            .find(|c| c.log_index == index)
            .unwrap_or_else(|| panic!("checkpoint {index} not replayed: {replayed:?}"));
        assert_eq!(
            again.digest, digest,
            "the digest replayed at log index {index}"
        );
    }
    broker.stop().await;
}

/// Waiting requests are bounded per tenant and in all: beyond, a submission is
/// RESOURCE_EXHAUSTED naming the bound, and room made by a cancellation is usable at once.
#[tokio::test]
async fn waiting_requests_are_bounded_per_tenant_and_in_all() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.max_waiting_per_tenant = 3;
    config.max_waiting = 5;
    let broker = Broker::start(config).await;
    let mut a = broker.tenant(&broker.tenant_token("tenant-a")).await;
    let mut b = broker.tenant(&broker.tenant_token("tenant-b")).await;
    // Both h100 nodes, for an hour: everything after it waits.
    let whole = || gang(2, 8, "h100", 3_600_000);
    a.submit_request(submit("a0", whole())).await.unwrap();
    let mut waiting = Vec::new();
    for i in 1..=3 {
        let r = a
            .submit_request(submit(&format!("a{i}"), whole()))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.state(), pb::RequestState::Queued);
        waiting.push(r);
    }
    let e = a.submit_request(submit("a4", whole())).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message()
            .contains("tenant tenant-a has 3 requests waiting"),
        "{e:?}"
    );
    // Another tenant has room of its own, up to the bound of all.
    for i in 0..2 {
        b.submit_request(submit(&format!("b{i}"), whole()))
            .await
            .unwrap();
    }
    let e = b.submit_request(submit("b2", whole())).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("5 requests are waiting"), "{e:?}");
    // A retry of an accepted submission is answered as before, bound or not.
    let again = a.submit_request(submit("a1", whole())).await.unwrap();
    assert_eq!(again.into_inner().id, waiting[0].id);
    // A cancellation makes room at once.
    a.cancel_request(pb::CancelRequestRequest {
        request_id: String::new(),
        name: waiting[2].name.clone(),
    })
    .await
    .unwrap();
    a.submit_request(submit("a5", whole())).await.unwrap();
    broker.stop().await;
}
