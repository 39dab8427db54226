//! Mutual TLS for agents, with the real binaries: a broker whose `[tls] agent_ca` signs the
//! agents' certificates, and `suanli agent --client-cert` with no token. The certificate
//! names the Futian AI Computing Centre; a tenant's job (over TLS, with its token) runs there
//! and its exit status comes back.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use suanli_proto::v1 as pb;
use suanli_proto::v1::tenant_service_client::TenantServiceClient;
use support::{start_with, wait_for_credentials, with_token};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

const POOL: &str = "futian-aicc";

/// Signs certificates for the test.
struct Ca {
    pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Ca {
    fn new() -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "district CA");
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            pem,
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// Writes `name.pem` and `name.key` into `dir`: a certificate for `sans` and `usage`.
    fn issue(
        &self,
        dir: &Path,
        name: &str,
        sans: Vec<rcgen::SanType>,
        usage: rcgen::ExtendedKeyUsagePurpose,
    ) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
}

/// A running `suanli agent`, killed when dropped.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_with_a_client_certificate_and_no_token_runs_a_job() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path();
    let ca = Ca::new();
    std::fs::write(certs.join("ca.pem"), &ca.pem).unwrap();
    let localhost = std::net::IpAddr::from([127, 0, 0, 1]);
    ca.issue(
        certs,
        "server",
        vec![rcgen::SanType::IpAddress(localhost)],
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    );
    ca.issue(
        certs,
        "agent",
        vec![rcgen::SanType::URI(
            format!("suanli:pool:{POOL}").try_into().unwrap(),
        )],
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    );
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let config = format!(
        "[pools]\nsimulated = [\"*\"]\nagent = [\"{POOL}\"]\n\
         [tls]\ncert = \"{0}/server.pem\"\nkey = \"{0}/server.key\"\nagent_ca = \"{0}/ca.pem\"\n",
        certs.display()
    );
    let (_broker, addr) = start_with(&data, &config, &[]);
    let creds = wait_for_credentials(&data).await;
    let url = format!("https://{addr}");

    let state = dir.path().join("agent-state");
    let _agent = Agent(
        Command::new(env!("CARGO_BIN_EXE_suanli"))
            .args(["--addr", &url, "--ca-cert"])
            .arg(certs.join("ca.pem"))
            .arg("--client-cert")
            .arg(certs.join("agent.pem"))
            .arg("--client-key")
            .arg(certs.join("agent.key"))
            .args(["agent", "--fleet", "futian-2024", "--pool", POOL])
            .args(["--backend", "process", "--allow-root", "--state-dir"])
            .arg(&state)
            .env_remove("SUANLI_TOKEN")
            .stdout(Stdio::null())
            .stderr(support::log_file())
            .spawn()
            .expect("start suanli agent"),
    );

    // The tenant, over TLS with its token and no certificate.
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca.pem));
    let channel = Channel::from_shared(url)
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .expect("a TLS connection without a client certificate");
    let mut tenant = TenantServiceClient::new(channel);
    let token = creds.tenant("tenant-a").unwrap().to_string();
    let spec = pb::RequestSpec {
        shape: Some(pb::request_spec::Shape::Gang(pb::GangShape {
            nodes: 1,
            devices_per_node: 4,
        })),
        duration_ms: 3_600_000,
        constraints: Some(pb::Constraints {
            pools: vec![POOL.into()],
            ..Default::default()
        }),
        workload: Some(pb::Workload {
            argv: vec!["sh".into(), "-c".into(), "exit 3".into()],
            stop_grace_s: 2,
            ..Default::default()
        }),
        ..Default::default()
    };
    let req = pb::SubmitRequestRequest {
        request_id: String::new(),
        spec: Some(spec),
    };
    let name = tenant
        .submit_request(with_token(req, &token))
        .await
        .expect("submit")
        .into_inner()
        .name;
    // Only the agent can end it with an exit status: the job ran on the pool.
    let deadline = Instant::now() + Duration::from_secs(60);
    let ended = loop {
        let r = tenant
            .get_request(with_token(
                pb::GetRequestRequest { name: name.clone() },
                &token,
            ))
            .await
            .expect("get")
            .into_inner();
        if r.outcome.is_some() {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "the job never ended through the certified agent: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let outcome = ended.outcome.unwrap();
    assert_eq!(outcome.exit_code, Some(3), "{outcome:?}");
}
