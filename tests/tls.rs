//! With a certificate and key in its configuration, the broker speaks only TLS.

use suanli_e2e::{Bearer, Broker, test_config};
use suanli_proto::v1 as pb;
use suanli_proto::v1::tenant_service_client::TenantServiceClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

#[tokio::test]
async fn a_broker_with_a_certificate_serves_tls_only() {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert_path = dir.path().join("server.pem");
    let key_path = dir.path().join("server.key");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let mut config = test_config(&dir.path().join("data"));
    config.tls = Some((cert_path, key_path));
    let broker = Broker::start(config).await;
    let token = broker.tenant_token("tenant-a");

    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(cert.cert.pem()))
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://localhost:{}", broker.addr.port()))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .expect("a TLS connection");
    let mut client = TenantServiceClient::with_interceptor(channel, Bearer::new(&token));
    let list = client
        .list_requests(pb::ListRequestsRequest::default())
        .await
        .unwrap();
    assert!(list.into_inner().requests.is_empty());

    // Plain text is not served.
    let plain = Channel::from_shared(format!("http://{}", broker.addr))
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = plain {
        let mut client = TenantServiceClient::with_interceptor(channel, Bearer::new(&token));
        assert!(
            client
                .list_requests(pb::ListRequestsRequest::default())
                .await
                .is_err()
        );
    }
    broker.stop().await;
}
