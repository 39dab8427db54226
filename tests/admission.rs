//! Per-tenant admission through a real socket: a tenant over its rate is RESOURCE_EXHAUSTED
//! with a retry hint, other tenants are not refused, and the project's client channel waits as
//! the hint says, so every call of a client that honours it goes through.

use suanli_broker::admission::Limit;
use suanli_e2e::{Bearer, Broker, gang, submit, test_config};
use suanli_proto::failover::{LeaderChannel, PUSHBACK_METADATA, plain_endpoint};
use suanli_proto::v1 as pb;
use suanli_proto::v1::tenant_service_client::TenantServiceClient;
use tonic::Code;

#[tokio::test]
async fn a_tenant_over_its_rate_is_told_when_to_retry_and_others_are_not_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config
        .admission
        .tenants
        .insert("tenant-a".into(), Limit::new(5.0, Some(5.0)).unwrap());
    let broker = Broker::start(config).await;
    let spec = || gang(1, 8, "h100", 60_000);

    // Back to back, tenant-a passes its burst of 5 (and what refills meanwhile), then is
    // refused with a hint; tenant-b, without a limit, is never refused.
    let mut a = broker.tenant(&broker.tenant_token("tenant-a")).await;
    let mut b = broker.tenant(&broker.tenant_token("tenant-b")).await;
    let (mut passed, mut refused) = (0, Vec::new());
    for i in 0..40 {
        match a.submit_request(submit(&format!("a{i}"), spec())).await {
            Ok(_) => passed += 1,
            Err(e) => refused.push(e),
        }
        b.submit_request(submit(&format!("b{i}"), spec()))
            .await
            .expect("tenant-b has no limit");
    }
    assert!(passed >= 5, "the burst passes: {passed}");
    assert!(!refused.is_empty(), "40 calls at once are over 5 a second");
    let mut hints = Vec::new();
    for e in &refused {
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        assert!(
            e.message().contains("tenant-a is over its rate of 5"),
            "{e:?}"
        );
        let hint: u64 = e
            .metadata()
            .get(PUSHBACK_METADATA)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {PUSHBACK_METADATA} on {e:?}"));
        hints.push(hint);
    }
    // The first is told to wait for the next token (one every 200 ms); the ones after it, for
    // those told before them too: they are spread over the time the rate needs to serve them.
    assert!((1..=200).contains(&hints[0]), "{hints:?}");
    assert!(hints.len() < 2 || hints.last() > hints.first(), "{hints:?}");
    assert!(hints.iter().all(|&h| h <= 61_000), "{hints:?}");
    // A quote goes to the writer too: limited the same way.
    let mut quote_refused = false;
    for _ in 0..10 {
        let q = pb::QuoteRequestRequest { spec: Some(spec()) };
        if let Err(e) = a.quote_request(q).await {
            assert_eq!(e.code(), Code::ResourceExhausted);
            quote_refused = true;
        }
    }
    assert!(quote_refused);
    // Reads are not limited.
    for _ in 0..50 {
        a.get_tenant(pb::GetTenantRequest::default()).await.unwrap();
    }

    // A client that honours the hint gets every call through.
    let channel = LeaderChannel::new(
        vec![format!("http://{}", broker.addr)],
        Box::new(plain_endpoint),
    );
    let mut patient = TenantServiceClient::with_interceptor(
        channel,
        Bearer::new(&broker.tenant_token("tenant-a")),
    );
    for i in 0..12 {
        patient
            .submit_request(submit(&format!("patient-{i}"), spec()))
            .await
            .unwrap_or_else(|e| panic!("call {i} was not retried after its hint: {e:?}"));
    }
    broker.stop().await;
}
