//! Start-up and the gRPC server: recover the log, make sure the fleet, tenants and tokens are
//! there, start the writer, serve until shutdown, then let the writer finish its last batch.

use std::future::Future;
use std::sync::Arc;

use suanli_core::Command;
use suanli_proto::v1::operator_service_server::OperatorServiceServer;
use suanli_proto::v1::pool_service_server::PoolServiceServer;
use suanli_proto::v1::tenant_service_server::TenantServiceServer;
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tracing::{info, warn};

use crate::auth::{Principal, Tokens, hash_secret, new_token};
use crate::config::{BrokerConfig, Execution};
use crate::credentials::{self, AgentToken, Credentials, TenantToken};
use crate::error::BrokerError;
use crate::ha::{self, Replica};
use crate::http::{self, HttpState};
use crate::metrics::{Metrics, RpcLayer, RpcMetrics};
use crate::service::{Shared, operator::OperatorApi, pool::PoolApi, tenant::TenantApi};
use crate::store::{RedbStore, Store};
use crate::views::Views;
use crate::writer::{self, Writer};

/// What a broker run ends with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunSummary {
    /// The engine digest after the last batch.
    pub digest: u64,
    /// The accounting ledger after the last batch.
    pub ledger: suanli_billing::Ledger,
}

/// The bound sockets a broker serves on.
pub struct Listeners {
    /// gRPC.
    pub grpc: TcpListener,
    /// HTTP (metrics, health, the console), when wanted.
    pub http: Option<TcpListener>,
}

/// Runs a broker on a bound gRPC listener until `shutdown` completes, with its HTTP side on
/// the configured `http` address (bound here) when there is one. The data folder holds the
/// log and `credentials.toml`; on return every acknowledged command is durable.
pub async fn run(
    listener: TcpListener,
    config: BrokerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<RunSummary, BrokerError> {
    let http = match config.http {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|e| BrokerError::Config(format!("http: listen on {addr}: {e}")))?,
        ),
        None => None,
    };
    run_with(
        Listeners {
            grpc: listener,
            http,
        },
        config,
        shutdown,
    )
    .await
}

/// Runs a broker on bound listeners until `shutdown` completes (the listeners win over the
/// configured addresses).
pub async fn run_with(
    listeners: Listeners,
    config: BrokerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<RunSummary, BrokerError> {
    let Listeners {
        grpc: listener,
        http,
    } = listeners;
    let config = Arc::new(config);
    let views = Arc::new(Views::default());
    let tokens = Tokens::default();
    let (watch, _) = broadcast::channel(4096);
    let grpc_addr = listener
        .local_addr()
        .map_err(|e| BrokerError::Config(e.to_string()))?;
    let group = if config.etcd.is_empty() {
        None
    } else {
        Some(ha::Group::connect(&config, grpc_addr)?)
    };
    let replica = group
        .as_ref()
        .map_or_else(Replica::standalone, |g| g.replica.clone());
    let w = match &group {
        None => {
            let store: Arc<dyn Store> = Arc::new(RedbStore::open(&config.data_dir)?);
            let mut w = Writer::recover(
                config.clone(),
                store,
                views.clone(),
                tokens.clone(),
                watch.clone(),
                replica.clone(),
            )?;
            let file = credentials_file(&config);
            let (commands, grants) = start_up(&config, w.engine(), &tokens, Some(&file));
            let granted = w.bootstrap(commands, grants)?;
            let creds = save_credentials(&config, &tokens, &granted)?;
            if config.announce {
                announce(
                    &config,
                    &creds,
                    http.as_ref().and_then(|l| l.local_addr().ok()),
                );
            }
            w
        }
        Some(g) => {
            // Reading the log from etcd blocks: off the runtime's threads.
            let (config, store, views, tokens, watch, replica) = (
                config.clone(),
                g.store.clone() as Arc<dyn Store>,
                views.clone(),
                tokens.clone(),
                watch.clone(),
                replica.clone(),
            );
            tokio::task::spawn_blocking(move || {
                Writer::recover(config, store, views, tokens, watch, replica)
            })
            .await
            .map_err(|e| BrokerError::Unavailable(e.to_string()))??
        }
    };
    // Every method the server routes, so that RPC metrics know them by name.
    let rpc = Arc::new(RpcMetrics::new(&[
        suanli_proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ]));
    let writer_metrics = w.metrics();
    let trail = w.trail();
    let metrics = Arc::new(Metrics::new(
        views.clone(),
        writer_metrics.clone(),
        rpc.clone(),
        replica.clone(),
        trail.clone(),
    ));
    let (handle, join) = writer::spawn(w, config.queue_capacity);
    let stopper = handle.clone();

    let (stop_tx, stopping) = tokio::sync::watch::channel(false);
    if let Some(g) = &group {
        g.start(handle.clone(), stopping.clone());
    }
    let mut stopped = stopping.clone();
    let shutdown = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    let http_task = http.map(|l| {
        let state = HttpState {
            views: views.clone(),
            tokens: tokens.clone(),
            trail: trail.clone(),
            stopping: stopping.clone(),
            open_metrics: config.http_open_metrics,
            metrics: metrics.clone(),
            replica: replica.clone(),
        };
        let mut stopped = stopping.clone();
        let addr = l.local_addr().ok();
        info!(?addr, "http serving");
        tokio::spawn(http::serve(l, http::router(state), async move {
            let _ = stopped.wait_for(|&s| s).await;
        }))
    });
    let shared = Shared {
        writer: handle,
        views,
        watch,
        stopping,
        agents: Arc::default(),
        metrics: writer_metrics,
        replica: replica.clone(),
        tokens: tokens.clone(),
        trail: trail.clone(),
        admission: Arc::new(crate::admission::Admission::new(config.admission.clone())),
    };
    let max = config.max_message_bytes;
    let auth = move |t: Tokens| {
        let trail = trail.clone();
        move |req: tonic::Request<()>| {
            let peer = req.remote_addr();
            t.authenticate(req).inspect_err(|e| {
                let peer = peer.map_or_else(String::new, |a| a.to_string());
                trail.auth_failed(writer::wall_ms(), peer, e.message().to_string());
            })
        }
    };
    let tenant = InterceptedService::new(
        TenantServiceServer::new(TenantApi(shared.clone())).max_decoding_message_size(max),
        auth(tokens.clone()),
    );
    let pool = InterceptedService::new(
        PoolServiceServer::new(PoolApi(shared.clone())).max_decoding_message_size(max),
        auth(tokens.clone()),
    );
    let operator = InterceptedService::new(
        OperatorServiceServer::new(OperatorApi(shared.clone())).max_decoding_message_size(max),
        auth(tokens.clone()),
    );
    drop(shared);
    let (health, health_service) = tonic_health::server::health_reporter();
    // SERVING on the leader (a broker on its own always leads), NOT_SERVING on followers: a
    // load balancer's gRPC health check finds the leader.
    let mut role = replica.subscribe();
    tokio::spawn(async move {
        loop {
            let leader = role.borrow_and_update().leader;
            let status = if leader {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            health.set_service_status("", status).await;
            for name in [
                <TenantServiceServer<TenantApi> as tonic::server::NamedService>::NAME,
                <PoolServiceServer<PoolApi> as tonic::server::NamedService>::NAME,
                <OperatorServiceServer<OperatorApi> as tonic::server::NamedService>::NAME,
            ] {
                health.set_service_status(name, status).await;
            }
            if role.changed().await.is_err() {
                break;
            }
        }
    });
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(suanli_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| BrokerError::Config(format!("reflection: {e}")))?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(suanli_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| BrokerError::Config(format!("reflection: {e}")))?;

    let mut builder = Server::builder();
    if let Some((cert, key)) = &config.tls {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| BrokerError::Config(format!("tls {}: {e}", p.display())))
        };
        let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(read(cert)?, read(key)?));
        if let Some(ca) = &config.agent_ca {
            // Asked of every client, required of none: tenants and operators come with
            // tokens; an agent may come with a certificate naming its pool instead.
            tls = tls
                .client_ca_root(Certificate::from_pem(read(ca)?))
                .client_auth_optional(true);
        }
        builder = builder
            .tls_config(tls)
            .map_err(|e| BrokerError::Config(format!("tls: {e}")))?;
    }
    let addr = grpc_addr;
    info!(%addr, data_dir = %config.data_dir.display(), "serving");
    let serve = builder
        .layer(RpcLayer(rpc))
        .layer(ha::gate::FollowerGate(replica.clone()))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(tenant)
        .add_service(pool)
        .add_service(operator)
        // Without TCP_NODELAY a stream's small messages (a StartLease, a report's
        // acknowledgement, a watch event) wait for the peer's delayed ACK: 40 ms each.
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        );
    // Open calls get a grace period after the stop; a client that keeps its stream open (an
    // agent that does not hang up) does not hold the broker up beyond it.
    let grace = config.shutdown_grace;
    let overdue = async move {
        let _ = stopped.wait_for(|&s| s).await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        served = serve => served.map_err(|e| BrokerError::Unavailable(format!("server: {e}")))?,
        () = overdue => warn!(?grace, "calls still open after the grace period: closing them"),
    }
    if let Some(mut task) = http_task {
        // Live console streams do not end by themselves: they get the same grace period.
        match tokio::time::timeout(grace, &mut task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => warn!("http server: {e}"),
            Ok(Err(e)) => warn!("http server task: {e}"),
            Err(_) => task.abort(),
        }
    }
    info!("stopped accepting; finishing the last batch");
    let (digest, ledger) = tokio::task::spawn_blocking(move || {
        stopper.stop();
        join.join()
    })
    .await
    .map_err(|e| BrokerError::Unavailable(e.to_string()))?
    .map_err(|_| BrokerError::Unavailable("the writer panicked".into()))??;
    if let Some(g) = &group {
        // The last batch is in the log: hand the election over at once rather than after
        // the lease runs out.
        g.resign().await;
    }
    info!(digest, "stopped");
    Ok(RunSummary { digest, ledger })
}

/// The engine digest that recovery from the data folder gives, without serving: equal to the
/// digest a stopped broker reported, since the engine is deterministic.
pub fn recovered_digest(config: &BrokerConfig) -> Result<u64, BrokerError> {
    let store = RedbStore::open(&config.data_dir)?;
    let (watch, _) = broadcast::channel(1);
    let w = Writer::recover(
        Arc::new(config.clone()),
        Arc::new(store),
        Arc::new(Views::default()),
        Tokens::default(),
        watch,
        Replica::standalone(),
    )?;
    Ok(w.engine().digest())
}

/// The ledger that recovery from the data folder gives, without serving: equal to the ledger
/// a stopped broker reported, since it is derived from the log.
pub fn recovered_ledger(config: &BrokerConfig) -> Result<suanli_billing::Ledger, BrokerError> {
    let store = RedbStore::open(&config.data_dir)?;
    let (watch, _) = broadcast::channel(1);
    let w = Writer::recover(
        Arc::new(config.clone()),
        Arc::new(store),
        Arc::new(Views::default()),
        Tokens::default(),
        watch,
        Replica::standalone(),
    )?;
    Ok(w.ledger().clone())
}

/// What start-up (or a replica taking over) must add to a recovered engine: missing pools,
/// changed tenants, and start-up tokens (see [`crate::auth::primary_name`]): a configured
/// token that is new or changed, a generated one for a principal that never had one. A
/// configured token an operator revoked stays revoked.
///
/// `dev_file` is the credentials file of a broker on its own: a generated token whose secret
/// is no longer in it (the file was deleted) is generated again, since the broker keeps only
/// hashes and nobody could use it otherwise. A group never does this: another replica may
/// hold the file.
pub(crate) fn start_up(
    config: &BrokerConfig,
    engine: &suanli_core::Engine,
    tokens: &Tokens,
    dev_file: Option<&Credentials>,
) -> (Vec<Command>, Vec<(Principal, String)>) {
    let mut commands = Vec::new();
    for p in &config.fleet.pools {
        if engine.pool_spec(&p.id).is_none() {
            commands.push(Command::RegisterPool(p.clone()));
        }
    }
    for t in &config.tenants {
        let same = engine.tenant_usage(&t.spec.name).is_some_and(|u| {
            u.quota_tflops == t.spec.quota_tflops
                && u.borrow_limit_tflops == t.spec.borrow_limit_tflops
                && u.weight == t.spec.weight
        });
        if !same {
            commands.push(Command::SetTenant(t.spec.clone()));
        }
    }
    let mut grants = Vec::new();
    let mut want = |p: Principal, configured: Option<&String>, prefix: &str| match (
        configured,
        tokens.primary(&p),
    ) {
        (Some(t), Some(cur)) if cur.hash == hash_secret(t) => {
            if cur.revoked_ms.is_some() {
                warn!(
                    token = cur.name,
                    "the configured token was revoked: it is not granted again; configure \
                     another to grant one"
                );
            }
        }
        (Some(t), _) => grants.push((p, t.clone())),
        (None, Some(cur)) => {
            let in_file = dev_file.map(|f| match &p {
                Principal::Operator => Some(f.operator.as_str()),
                Principal::Tenant(t) => f.tenant(t),
                Principal::Agent(pool) => f.agent(pool),
            });
            let lost = match in_file {
                Some(secret) => secret.is_none_or(|s| hash_secret(s) != cur.hash),
                None => false,
            };
            if lost && cur.revoked_ms.is_none() {
                grants.push((p, new_token(prefix)));
            }
        }
        (None, None) => grants.push((p, new_token(prefix))),
    };
    want(
        Principal::Operator,
        config.operator_token.as_ref(),
        "operator",
    );
    for t in &config.tenants {
        want(
            Principal::Tenant(t.spec.name.clone()),
            t.token.as_ref(),
            "tenant",
        );
    }
    for p in &config.fleet.pools {
        if config.execution(&p.id) == Some(Execution::Agent) {
            want(Principal::Agent(p.id.clone()), None, "agent");
        }
    }
    (commands, grants)
}

/// Prints the credentials for a person starting the broker by hand.
fn announce(config: &BrokerConfig, c: &Credentials, http: Option<std::net::SocketAddr>) {
    println!(
        "credentials (also in {}):",
        config.data_dir.join(credentials::FILE_NAME).display()
    );
    if c.operator.is_empty() {
        println!("  operator  (configured: not in the file)");
    } else {
        println!("  operator  {}", c.operator);
    }
    if let Some(addr) = http
        && !c.operator.is_empty()
    {
        println!("  console   http://{addr}/login?token={}", c.operator);
    }
    for t in &c.tenants {
        println!("  tenant    {:<14} {}", t.name, t.token);
    }
    for a in &c.agents {
        println!("  agent     {:<14} {}", a.pool, a.token);
    }
}

/// The credentials file of the data folder as it is (empty when missing or unreadable).
fn credentials_file(config: &BrokerConfig) -> Credentials {
    let path = config.data_dir.join(credentials::FILE_NAME);
    if !path.exists() {
        return Credentials::default();
    }
    Credentials::load(&path).unwrap_or_else(|e| {
        warn!(error = %e, "the credentials file is unreadable: written again");
        Credentials::default()
    })
}

/// Brings the credentials file of the data folder up to date: the start-up tokens just
/// `granted` are added (their secrets are known only now: the broker keeps hashes), and tokens
/// that no longer work are dropped. Returns what the file holds.
pub(crate) fn save_credentials(
    config: &BrokerConfig,
    tokens: &Tokens,
    granted: &[(Principal, String)],
) -> Result<Credentials, BrokerError> {
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| BrokerError::Config(format!("creating {}: {e}", config.data_dir.display())))?;
    let path = config.data_dir.join(credentials::FILE_NAME);
    let mut creds = credentials_file(config);
    let before = creds.clone();
    for (principal, secret) in granted {
        match principal {
            Principal::Operator => creds.operator = secret.clone(),
            Principal::Tenant(name) => {
                creds.tenants.retain(|t| t.name != *name);
                creds.tenants.push(TenantToken {
                    name: name.clone(),
                    token: secret.clone(),
                });
            }
            Principal::Agent(pool) => {
                creds.agents.retain(|a| a.pool != *pool);
                creds.agents.push(AgentToken {
                    pool: pool.clone(),
                    token: secret.clone(),
                });
            }
        }
    }
    let now = writer::wall_ms();
    let works = |p: Principal, secret: &str| tokens.grants(&hash_secret(secret), &p, now);
    if !creds.operator.is_empty() && !works(Principal::Operator, &creds.operator) {
        creds.operator.clear();
    }
    creds
        .tenants
        .retain(|t| works(Principal::Tenant(t.name.clone()), &t.token));
    creds
        .agents
        .retain(|a| works(Principal::Agent(a.pool.clone()), &a.token));
    creds.tenants.sort_by(|a, b| a.name.cmp(&b.name));
    creds.agents.sort_by(|a, b| a.pool.cmp(&b.pool));
    if creds != before || !path.exists() {
        creds
            .save(&path)
            .map_err(|e| BrokerError::Config(e.to_string()))?;
    }
    Ok(creds)
}
