//! What the end-to-end tests share: a broker started in-process on 127.0.0.1:0 with a small
//! known fleet, and clients that carry a bearer token.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use suanli_broker::credentials::{Credentials, FILE_NAME};
use suanli_broker::{BrokerConfig, RunSummary};
use suanli_core::{Catalogue, Fleet};
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

/// A configuration for tests: the small fleet, fast ticks, data in `dir`.
pub fn test_config(dir: &Path) -> BrokerConfig {
    let mut c = BrokerConfig::dev_default();
    c.data_dir = dir.to_path_buf();
    c.fleet = Fleet::from_toml(SMALL_FLEET, &Catalogue::builtin()).expect("small fleet");
    c.tick_interval = Duration::from_millis(20);
    c
}

/// A broker running in this process.
pub struct Broker {
    /// Where it listens.
    pub addr: SocketAddr,
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
        let dir = config.data_dir.clone();
        let _ = std::fs::remove_file(dir.join(FILE_NAME));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(suanli_broker::run(listener, config, async {
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
            creds,
            dir,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops the broker gracefully and returns its final digest.
    pub async fn stop(mut self) -> u64 {
        let _ = self.stop.take().expect("running").send(());
        let summary = self
            .task
            .take()
            .expect("running")
            .await
            .expect("join")
            .expect("clean stop");
        summary.digest
    }

    async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .expect("uri")
            .connect()
            .await
            .expect("connect")
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
