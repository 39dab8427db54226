//! What the end-to-end tests share: a broker started in-process on 127.0.0.1:0 with a small
//! known fleet, and clients that carry a bearer token.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use suanli_broker::credentials::{Credentials, FILE_NAME};
use suanli_broker::{BrokerConfig, RunSummary};
use suanli_core::{Catalogue, Fleet};
use suanli_proto::v1 as pb;
use suanli_proto::v1::operator_service_client::OperatorServiceClient;
use suanli_proto::v1::pool_service_client::PoolServiceClient;
use suanli_proto::v1::tenant_service_client::TenantServiceClient;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Two pools: `near` (local, 2 nodes of 8 h100) and `far` (external, 2 nodes of 8 a800).
pub const SMALL_FLEET: &str = r#"
name = "small"

[[pool]]
id = "near"
kind = "local_centre"
region = "guangdong-shenzhen"
rtt_ms = 1
data_zone = "mainland"
[[pool.group]]
model = "h100"
devices_per_node = 8
nodes = 2
interconnect = "nvlink"
price_fen_per_device_hour = 3000

[[pool]]
id = "far"
kind = "external"
region = "guizhou-guiyang"
rtt_ms = 30
data_zone = "mainland"
[[pool.group]]
model = "a800"
devices_per_node = 8
nodes = 2
interconnect = "nvlink"
price_fen_per_device_hour = 1000
"#;

/// A standard-priority gang of `nodes` x `m` devices of `model`.
pub fn gang(nodes: u32, m: u32, model: &str, duration_ms: u64) -> pb::RequestSpec {
    pb::RequestSpec {
        shape: Some(pb::request_spec::Shape::Gang(pb::GangShape {
            nodes,
            devices_per_node: m,
        })),
        duration_ms,
        priority: pb::Priority::Standard as i32,
        constraints: Some(pb::Constraints {
            models: vec![model.into()],
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A submission of `spec` under the client's `request_id` (empty: none).
pub fn submit(request_id: &str, spec: pb::RequestSpec) -> pb::SubmitRequestRequest {
    pb::SubmitRequestRequest {
        request_id: request_id.into(),
        spec: Some(spec),
    }
}

/// A configuration for tests: the small fleet, fast ticks, data in `dir`.
pub fn test_config(dir: &Path) -> BrokerConfig {
    let mut c = BrokerConfig::dev_default();
    c.data_dir = dir.to_path_buf();
    c.fleet = Fleet::from_toml(SMALL_FLEET, &Catalogue::builtin()).expect("small fleet");
    c.tick_interval = Duration::from_millis(20);
    // Tests run side by side: each that wants the HTTP side binds its own free port.
    c.http = None;
    c
}

/// The operator API's figures, to check other views of the broker against.
pub struct OperatorFigures {
    /// The fleet summary.
    pub fleet: pb::FleetSummary,
    /// Every pool.
    pub pools: Vec<pb::Pool>,
    /// Every tenant.
    pub tenants: Vec<pb::Tenant>,
}

/// A broker running in this process.
pub struct Broker {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Where its HTTP side listens, when started with [`Broker::start_with_http`].
    pub http: Option<SocketAddr>,
    /// Its credentials file.
    pub creds: Credentials,
    /// Its data folder.
    pub dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<RunSummary, suanli_broker::BrokerError>>>,
}

impl Broker {
    /// Starts a broker with `config` on 127.0.0.1:0 and waits for its credentials file.
    pub async fn start(config: BrokerConfig) -> Broker {
        Self::start_on(config, false).await
    }

    /// Starts a broker as [`Broker::start`] does, with its HTTP side on another free port.
    pub async fn start_with_http(config: BrokerConfig) -> Broker {
        Self::start_on(config, true).await
    }

    async fn start_on(config: BrokerConfig, with_http: bool) -> Broker {
        let dir = config.data_dir.clone();
        // A restart keeps the credentials file: the broker keeps only hashes of the tokens in it.
        let bind = || tokio::net::TcpListener::bind("127.0.0.1:0");
        let listener = bind().await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let http_listener = if with_http {
            Some(bind().await.expect("bind http"))
        } else {
            None
        };
        let http = http_listener
            .as_ref()
            .map(|l| l.local_addr().expect("addr"));
        let listeners = suanli_broker::Listeners {
            grpc: listener,
            http: http_listener,
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(suanli_broker::run_with(listeners, config, async {
            let _ = stopped.await;
        }));
        let creds = loop {
            if let Ok(c) = Credentials::load(&dir.join(FILE_NAME)) {
                break c;
            }
            assert!(!task.is_finished(), "the broker stopped during start-up");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        Broker {
            addr,
            http,
            creds,
            dir,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops the broker gracefully and returns its final digest.
    pub async fn stop(self) -> u64 {
        self.stop_summary().await.digest
    }

    /// Stops the broker gracefully and returns what it reported: its final digest and ledger.
    pub async fn stop_summary(mut self) -> RunSummary {
        let _ = self.stop.take().expect("running").send(());
        self.task
            .take()
            .expect("running")
            .await
            .expect("join")
            .expect("clean stop")
    }

    async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .expect("uri")
            .connect()
            .await
            .expect("connect")
    }

    /// What the operator API says of the fleet, every pool (one page) and every tenant.
    pub async fn operator_figures(&self) -> OperatorFigures {
        let mut op = self.operator(&self.creds.operator).await;
        let fleet = op
            .get_fleet_summary(pb::GetFleetSummaryRequest::default())
            .await
            .expect("fleet summary")
            .into_inner();
        let pools = op
            .list_pools(pb::ListPoolsRequest::default())
            .await
            .expect("pools")
            .into_inner()
            .pools;
        let tenants = op
            .list_tenants(pb::ListTenantsRequest::default())
            .await
            .expect("tenants")
            .into_inner()
            .tenants;
        OperatorFigures {
            fleet,
            pools,
            tenants,
        }
    }

    /// A tenant client with `token`.
    pub async fn tenant(
        &self,
        token: &str,
    ) -> TenantServiceClient<InterceptedService<Channel, Bearer>> {
        TenantServiceClient::with_interceptor(self.channel().await, Bearer::new(token))
    }

    /// An operator client with `token`.
    pub async fn operator(
        &self,
        token: &str,
    ) -> OperatorServiceClient<InterceptedService<Channel, Bearer>> {
        OperatorServiceClient::with_interceptor(self.channel().await, Bearer::new(token))
    }

    /// A pool client with `token`.
    pub async fn pool(
        &self,
        token: &str,
    ) -> PoolServiceClient<InterceptedService<Channel, Bearer>> {
        PoolServiceClient::with_interceptor(self.channel().await, Bearer::new(token))
    }

    /// The token of a development tenant.
    pub fn tenant_token(&self, name: &str) -> String {
        self.creds.tenant(name).expect("tenant token").to_string()
    }
}

/// Puts `authorization: Bearer <token>` on every call (an empty token sends none).
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    /// For `token`.
    pub fn new(token: &str) -> Self {
        Bearer((!token.is_empty()).then(|| format!("Bearer {token}").parse().expect("ascii token")))
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// An HTTP/1.1 response as a test reads it.
#[derive(Debug)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Header lines, names in lower case.
    pub headers: Vec<(String, String)>,
    /// The body (de-chunked).
    pub body: String,
}

impl HttpResponse {
    /// The first header of that (lower-case) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `GET path` on a real socket, with the operator's (or any) bearer token when given.
pub async fn http_get(addr: SocketAddr, path: &str, token: Option<&str>) -> HttpResponse {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect http");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("send");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.expect("read");
    let text = String::from_utf8(raw).expect("utf-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("header end");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    HttpResponse {
        status,
        headers,
        body,
    }
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).expect("chunk size");
        if n == 0 {
            break;
        }
        out.push_str(&tail[..n]);
        rest = &tail[n + 2..];
    }
    out
}

/// An agent's first message on its stream: it is the agent of `pool` and runs `running`.
pub fn agent_hello(pool: &str, running: Vec<u64>) -> pb::AgentMessage {
    pb::AgentMessage {
        body: Some(pb::agent_message::Body::Hello(pb::Hello {
            pool: pool.into(),
            agent_version: "test".into(),
            running_requests: running,
            ..Default::default()
        })),
    }
}
