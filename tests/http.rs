//! The broker's HTTP side on a real socket: health, readiness, and who may read what.

use suanli_e2e::{Broker, http_get, test_config};

#[tokio::test]
async fn health_and_readiness_answer_on_the_http_port() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start_with_http(test_config(dir.path())).await;
    let http = broker.http.expect("http side");
    let health = http_get(http, "/healthz", None).await;
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
    let ready = http_get(http, "/readyz", None).await;
    assert_eq!((ready.status, ready.body.as_str()), (200, "ready\n"));
    broker.stop().await;
}

#[tokio::test]
async fn closed_health_routes_need_the_operator_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = test_config(dir.path());
    config.http_open_metrics = false;
    let broker = Broker::start_with_http(config).await;
    let http = broker.http.expect("http side");
    assert_eq!(http_get(http, "/healthz", None).await.status, 401);
    let tenant = broker.creds.tenants[0].token.clone();
    assert_eq!(http_get(http, "/healthz", Some(&tenant)).await.status, 401);
    let op = broker.creds.operator.clone();
    assert_eq!(http_get(http, "/healthz", Some(&op)).await.status, 200);
    broker.stop().await;
}
