//! With a certificate and key in its configuration, the broker speaks only TLS.

use suanli_e2e::{Bearer, Broker, agent_hello, test_config};
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

/// A certificate authority for the test: its certificate (PEM) and what signs with it.
struct Ca {
    pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            pem,
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A certificate (PEM) and its key (PEM), for `sans` and `usage`.
    fn sign(
        &self,
        sans: Vec<rcgen::SanType>,
        usage: rcgen::ExtendedKeyUsagePurpose,
    ) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn agent(&self, pool: &str) -> (String, String) {
        let uri = format!("suanli:pool:{pool}").try_into().unwrap();
        self.sign(
            vec![rcgen::SanType::URI(uri)],
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        )
    }
}

/// A TLS channel to `broker` that trusts `ca`, presenting `client` (certificate and key) if
/// given.
async fn tls_channel(
    broker: &Broker,
    ca: &Ca,
    client: Option<&(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca.pem))
        .domain_name("localhost");
    if let Some((cert, key)) = client {
        tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
    }
    Channel::from_shared(format!("https://localhost:{}", broker.addr.port()))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
}

#[tokio::test]
async fn an_agents_client_certificate_names_its_pool_and_acts_for_it_only() {
    use suanli_proto::v1::pool_service_client::PoolServiceClient;
    use tokio_stream::StreamExt as _;
    use tokio_stream::wrappers::ReceiverStream;
    use tonic::Code;

    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("district agents CA");
    let (server_cert, server_key) = ca.sign(
        vec![rcgen::SanType::DnsName("localhost".try_into().unwrap())],
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    );
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let mut config = test_config(&dir.path().join("data"));
    config.tls = Some((
        write("server.pem", &server_cert),
        write("server.key", &server_key),
    ));
    config.agent_ca = Some(write("agents-ca.pem", &ca.pem));
    config.agent_pools = vec!["near".into(), "far".into()];
    let broker = Broker::start(config).await;
    let near = ca.agent("near");

    // The certificate alone is near's agent: its stream opens, with no token.
    let channel = tls_channel(&broker, &ca, Some(&near)).await.unwrap();
    let mut agent = PoolServiceClient::with_interceptor(channel.clone(), Bearer::new(""));
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(agent_hello("near", vec![])).await.unwrap();
    let mut stream = agent
        .connect_agent(ReceiverStream::new(rx))
        .await
        .expect("near's certificate opens near's stream")
        .into_inner();
    let welcome = stream.next().await.unwrap().unwrap();
    assert!(matches!(
        welcome.body,
        Some(pb::broker_message::Body::Welcome(_))
    ));

    // Not another pool's stream, nor its registration, nor a tenant's call.
    let (tx_far, rx_far) = tokio::sync::mpsc::channel(4);
    tx_far.send(agent_hello("far", vec![])).await.unwrap();
    let e = agent
        .connect_agent(ReceiverStream::new(rx_far))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("may not act for pool far"), "{e:?}");
    let e = agent
        .register_pool(pb::RegisterPoolRequest {
            request_id: String::new(),
            pool: Some(pb::Pool {
                id: "far".into(),
                kind: pb::PoolKind::External as i32,
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let mut as_tenant = TenantServiceClient::with_interceptor(channel.clone(), Bearer::new(""));
    let e = as_tenant
        .list_requests(pb::ListRequestsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // A token sent with the certificate must be the same agent's.
    let token = broker.tenant_token("tenant-a");
    let mut both = TenantServiceClient::with_interceptor(channel, Bearer::new(&token));
    let e = both
        .list_requests(pb::ListRequestsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("pool near"), "{e:?}");

    // Tenants connect without a certificate, with their tokens, as before; without either,
    // a call is UNAUTHENTICATED.
    let plain = tls_channel(&broker, &ca, None).await.unwrap();
    let mut tenant = TenantServiceClient::with_interceptor(plain.clone(), Bearer::new(&token));
    tenant
        .list_requests(pb::ListRequestsRequest::default())
        .await
        .expect("a tenant's token without a certificate");
    let mut nobody = PoolServiceClient::with_interceptor(plain, Bearer::new(""));
    let (tx2, rx2) = tokio::sync::mpsc::channel(4);
    tx2.send(agent_hello("near", vec![])).await.unwrap();
    let e = nobody
        .connect_agent(ReceiverStream::new(rx2))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");

    // A certificate from another CA, naming near, is refused at the handshake.
    let rogue = Ca::new("someone else").agent("near");
    let refused = match tls_channel(&broker, &ca, Some(&rogue)).await {
        Err(_) => true,
        Ok(channel) => TenantServiceClient::with_interceptor(channel, Bearer::new(&token))
            .list_requests(pb::ListRequestsRequest::default())
            .await
            .is_err(),
    };
    assert!(
        refused,
        "a certificate the agents' CA did not sign is refused"
    );
    drop(tx);
    broker.stop().await;
}
