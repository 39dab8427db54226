//! Connecting to the broker: the address (plain `http://` or TLS `https://`), the bearer token,
//! and how errors are told to the user.
//!
//! A token comes from `--token` (or `SUANLI_TOKEN`). Without one, the client reads the
//! credentials file that `suanli serve` writes in its data folder and takes the operator's token
//! for operator commands, a tenant's token for tenant commands (the first tenant, or the one
//! named by `--tenant`) and the pool's token for an agent.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Args;
use suanli_broker::credentials::{self, Credentials, CredentialsError};
use suanli_proto::failover::{self, LeaderChannel};
use suanli_proto::v1::operator_service_client::OperatorServiceClient;
use suanli_proto::v1::pool_service_client::PoolServiceClient;
use suanli_proto::v1::tenant_service_client::TenantServiceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};

/// Where a broker started with no options listens.
pub const DEFAULT_ADDR: &str = "http://127.0.0.1:50051";
/// Where a broker started with no options keeps its data.
pub const DEFAULT_DATA_DIR: &str = "suanli-data";
/// Largest reply the client accepts (a page of 1000 pools or requests fits easily).
const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Options shared by every command.
#[derive(Args, Clone, Debug)]
pub struct GlobalArgs {
    /// Address of the broker (`http://` or `https://`); of a group, several, comma-separated:
    /// calls go to the one that leads.
    #[arg(long, global = true, env = "SUANLI_ADDR", default_value = DEFAULT_ADDR, value_name = "URL[,URL...]")]
    pub addr: String,
    /// Bearer token; without one, the credentials file in the data folder is used.
    #[arg(
        long,
        global = true,
        env = "SUANLI_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,
    /// Tenant whose token to take from the credentials file (default: the first), and whose
    /// requests bare ids name.
    #[arg(long, global = true, env = "SUANLI_TENANT", value_name = "NAME")]
    pub tenant: Option<String>,
    /// The broker's data folder, which holds `credentials.toml` [default: suanli-data].
    #[arg(long, global = true, env = "SUANLI_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// PEM file of the certificate authority to trust for an `https://` broker, in addition to
    /// the system's.
    #[arg(long, global = true, env = "SUANLI_CA_CERT", value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
    /// PEM file of a client certificate, for mutual TLS with an `https://` broker: an agent
    /// whose certificate names its pool (URI `suanli:pool:<id>`) needs no token.
    #[arg(
        long,
        global = true,
        env = "SUANLI_CLIENT_CERT",
        value_name = "FILE",
        requires = "client_key"
    )]
    pub client_cert: Option<PathBuf>,
    /// PEM file of the client certificate's private key.
    #[arg(
        long,
        global = true,
        env = "SUANLI_CLIENT_KEY",
        value_name = "FILE",
        requires = "client_cert"
    )]
    pub client_key: Option<PathBuf>,
    /// Print JSON instead of tables (one object, or one line per event).
    #[arg(long, global = true)]
    pub json: bool,
    /// Write logs as JSON lines instead of text.
    #[arg(long, global = true)]
    pub log_json: bool,
}

/// The files TLS with the broker uses: a CA to trust, a client certificate and its key.
#[derive(Clone, Debug, Default)]
pub struct TlsFiles {
    /// `--ca-cert`.
    pub ca_cert: Option<PathBuf>,
    /// `--client-cert` and `--client-key`.
    pub client: Option<(PathBuf, PathBuf)>,
}

impl GlobalArgs {
    /// What TLS with the broker uses.
    pub fn tls(&self) -> TlsFiles {
        TlsFiles {
            ca_cert: self.ca_cert.clone(),
            client: self.client_cert.clone().zip(self.client_key.clone()),
        }
    }

    /// The credentials file in the data folder.
    pub fn credentials_path(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR))
            .join(credentials::FILE_NAME)
    }
}

/// Paging of a list call.
#[derive(Args, Clone, Debug, Default)]
pub struct PageArgs {
    /// Fetch every page, not just the first.
    #[arg(long)]
    pub all_pages: bool,
    /// Items per page [default: the broker's, 100].
    #[arg(long, value_name = "N", default_value_t = 0, hide_default_value = true)]
    pub page_size: u32,
    /// Continue from this `next_page_token` of an earlier page.
    #[arg(
        long,
        value_name = "TOKEN",
        default_value = "",
        hide_default_value = true
    )]
    pub page_token: String,
}

impl PageArgs {
    /// Fetches pages with `fetch(page_size, page_token) -> (items, next_page_token)`: the
    /// first page, or every page with `--all-pages`. Returns the items and the token of the
    /// page after the last one fetched (empty after the last page).
    pub async fn collect<T, F, Fut>(&self, mut fetch: F) -> Result<(Vec<T>, String), Status>
    where
        F: FnMut(u32, String) -> Fut,
        Fut: Future<Output = Result<(Vec<T>, String), Status>>,
    {
        let mut items = Vec::new();
        let mut token = self.page_token.clone();
        loop {
            let (page, next) = fetch(self.page_size, token).await?;
            items.extend(page);
            token = next;
            if !self.all_pages || token.is_empty() {
                return Ok((items, token));
            }
        }
    }
}

/// Who a command acts as.
#[derive(Clone, Copy, Debug)]
pub enum Role<'a> {
    /// The district's operator.
    Operator,
    /// An AI company.
    Tenant,
    /// The agent of this pool.
    Agent(&'a str),
}

/// A caller: its token and, for a tenant, its name when known.
#[derive(Clone, Debug)]
pub struct Identity {
    /// Bearer token.
    pub token: String,
    /// The tenant's name, when the token is known to be a tenant's.
    pub tenant: Option<String>,
}

/// Reads the credentials file, with an error that says how to pass a token instead.
pub fn load_credentials(path: &Path) -> anyhow::Result<Credentials> {
    match Credentials::load(path) {
        Ok(c) => Ok(c),
        Err(CredentialsError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            bail!(
                "no token: pass --token TOKEN (or set SUANLI_TOKEN), or run where `suanli serve` \
                 keeps its data ({} not found; --data-dir DIR names another folder)",
                path.display()
            )
        }
        Err(e) => Err(e.into()),
    }
}

/// The token (and tenant) a command uses in `role`.
pub fn identity(g: &GlobalArgs, role: Role<'_>) -> anyhow::Result<Identity> {
    let path = g.credentials_path();
    if let Some(token) = &g.token {
        let tenant = match role {
            Role::Tenant => g.tenant.clone().or_else(|| {
                // A token from the credentials file names its tenant.
                let creds = Credentials::load(&path).ok()?;
                let bare = token.strip_prefix("Bearer ").unwrap_or(token);
                creds
                    .tenants
                    .into_iter()
                    .find(|t| t.token == bare)
                    .map(|t| t.name)
            }),
            _ => None,
        };
        return Ok(Identity {
            token: token.clone(),
            tenant,
        });
    }
    let creds = load_credentials(&path)?;
    let shown = path.display();
    match role {
        Role::Operator => Ok(Identity {
            token: creds.operator,
            tenant: None,
        }),
        Role::Tenant => {
            let found = match &g.tenant {
                Some(name) => creds.tenants.iter().find(|t| &t.name == name),
                None => creds.tenants.first(),
            };
            match found {
                Some(t) => Ok(Identity {
                    token: t.token.clone(),
                    tenant: Some(t.name.clone()),
                }),
                None => {
                    let known: Vec<&str> = creds.tenants.iter().map(|t| t.name.as_str()).collect();
                    match &g.tenant {
                        Some(name) => bail!(
                            "tenant {name:?} is not in {shown} (it has: {}); pass --token TOKEN",
                            if known.is_empty() {
                                "none".to_string()
                            } else {
                                known.join(", ")
                            }
                        ),
                        None => bail!("{shown} has no tenant; pass --token TOKEN"),
                    }
                }
            }
        }
        Role::Agent(pool) => match creds.agent(pool) {
            Some(token) => Ok(Identity {
                token: token.to_string(),
                tenant: None,
            }),
            None => bail!("{shown} has no agent token for pool {pool:?}; pass --token TOKEN"),
        },
    }
}

/// The endpoint of the broker, with TLS for `https://`.
pub fn endpoint(addr: &str, files: &TlsFiles) -> anyhow::Result<Endpoint> {
    let addr = failover::with_scheme(addr);
    let mut ep = Endpoint::from_shared(addr.clone())
        .with_context(|| format!("--addr {addr:?} is not a valid URL"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    if addr.starts_with("https://") {
        let read = |flag: &str, path: &Path| {
            std::fs::read(path).with_context(|| format!("{flag} {}: cannot read", path.display()))
        };
        let mut tls = ClientTlsConfig::new().with_enabled_roots();
        if let Some(path) = &files.ca_cert {
            tls = tls.ca_certificate(Certificate::from_pem(read("--ca-cert", path)?));
        }
        if let Some((cert, key)) = &files.client {
            tls = tls.identity(tonic::transport::Identity::from_pem(
                read("--client-cert", cert)?,
                read("--client-key", key)?,
            ));
        }
        ep = ep.tls_config(tls).context("setting up TLS")?;
    } else if files.ca_cert.is_some() || files.client.is_some() {
        bail!("--ca-cert and --client-cert are only for an https:// broker address, not {addr}");
    }
    Ok(ep)
}

/// The broker, or the brokers of a group: a channel that sends each call to the one that
/// leads (see `suanli_proto::failover`), connected to the first that answers.
pub async fn connect(g: &GlobalArgs) -> anyhow::Result<LeaderChannel> {
    let group = group(g)?;
    reach(&group, g).await?;
    Ok(group)
}

/// Connects `group` to the first of its brokers that answers, the one believed to lead
/// first; the error of the last one tried when none does.
pub async fn reach(group: &LeaderChannel, g: &GlobalArgs) -> anyhow::Result<()> {
    let mut last = None;
    for addr in group.addresses() {
        let ep = endpoint(&addr, &g.tls())?;
        match ep.connect().await {
            Ok(channel) => {
                group.adopt(&addr, channel);
                return Ok(());
            }
            Err(e) => last = Some((ep.uri().clone(), e)),
        }
    }
    let (uri, e) = last.expect("a group has at least one address");
    Err(e).with_context(|| format!("cannot connect to the broker at {uri}"))
}

/// The brokers `--addr` names, not connected yet.
pub fn group(g: &GlobalArgs) -> anyhow::Result<LeaderChannel> {
    let addrs = failover::parse_addresses(&g.addr);
    if addrs.is_empty() {
        bail!("--addr is empty: give the broker's address");
    }
    let files = g.tls();
    for a in &addrs {
        endpoint(a, &files)?;
    }
    Ok(LeaderChannel::new(
        addrs,
        Box::new(move |a| {
            endpoint(a, &files).map_err(|e| Status::invalid_argument(error_line(&e)))
        }),
    ))
}

/// Puts the bearer token in the `authorization` metadata of every call (none for an agent
/// that a client certificate identifies).
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    /// The header for a token (a token that already starts with `Bearer ` is taken as is).
    pub fn new(token: &str) -> anyhow::Result<Self> {
        let value = if token.starts_with("Bearer ") {
            token.to_string()
        } else {
            format!("Bearer {token}")
        };
        value
            .parse()
            .map(|v| Bearer(Some(v)))
            .map_err(|_| anyhow::anyhow!("the token is not a valid header value (printable ASCII)"))
    }

    /// No token: the client certificate identifies the caller.
    pub fn certificate_only() -> Self {
        Bearer(None)
    }

    /// The `authorization` header value, if any.
    pub fn value(&self) -> Option<&MetadataValue<Ascii>> {
        self.0.as_ref()
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(value) = &self.0 {
            req.metadata_mut().insert("authorization", value.clone());
        }
        Ok(req)
    }
}

/// A channel to the leader that authenticates every call.
pub type Authed = InterceptedService<LeaderChannel, Bearer>;

/// A tenant client and who it acts as.
pub async fn tenant_client(
    g: &GlobalArgs,
) -> anyhow::Result<(TenantServiceClient<Authed>, Identity)> {
    let id = identity(g, Role::Tenant)?;
    let bearer = Bearer::new(&id.token)?;
    let client = TenantServiceClient::with_interceptor(connect(g).await?, bearer)
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    Ok((client, id))
}

/// An operator client.
pub async fn operator_client(g: &GlobalArgs) -> anyhow::Result<OperatorServiceClient<Authed>> {
    let id = identity(g, Role::Operator)?;
    let bearer = Bearer::new(&id.token)?;
    Ok(
        OperatorServiceClient::with_interceptor(connect(g).await?, bearer)
            .max_decoding_message_size(MAX_MESSAGE_BYTES),
    )
}

/// A pool client over a group's channel.
pub fn pool_client(channel: LeaderChannel, bearer: Bearer) -> PoolServiceClient<Authed> {
    PoolServiceClient::with_interceptor(channel, bearer)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
}

/// The canonical name of a gRPC status code, as in the gRPC specification (`NOT_FOUND`).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A gRPC status as `CODE: message`, with the cause of a transport failure.
pub fn status_line(s: &Status) -> String {
    let mut line = format!("{}: {}", code_name(s.code()), s.message());
    let mut source = std::error::Error::source(s);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}

/// An error on one line: `CODE: message` for a gRPC status, its causes joined by `: `
/// otherwise.
pub fn error_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        if let Some(status) = cause.downcast_ref::<Status>() {
            parts.push(status_line(status));
            break;
        }
        let text = cause.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
    }
    parts
        .join(": ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(token: Option<&str>, tenant: Option<&str>, data_dir: &Path) -> GlobalArgs {
        GlobalArgs {
            addr: DEFAULT_ADDR.into(),
            token: token.map(Into::into),
            tenant: tenant.map(Into::into),
            data_dir: Some(data_dir.to_path_buf()),
            ca_cert: None,
            client_cert: None,
            client_key: None,
            json: false,
            log_json: false,
        }
    }

    #[test]
    fn addresses_get_a_scheme() {
        assert_eq!(
            failover::with_scheme("127.0.0.1:50051"),
            "http://127.0.0.1:50051"
        );
        assert_eq!(
            failover::with_scheme("https://broker:443"),
            "https://broker:443"
        );
        assert!(endpoint("http://a b", &TlsFiles::default()).is_err());
        let ca = TlsFiles {
            ca_cert: Some("ca.pem".into()),
            client: None,
        };
        assert!(endpoint("http://127.0.0.1:1", &ca).is_err());
        let client = TlsFiles {
            ca_cert: None,
            client: Some(("agent.pem".into(), "agent.key".into())),
        };
        let e = endpoint("http://127.0.0.1:1", &client).unwrap_err();
        assert!(e.to_string().contains("only for an https://"), "{e}");
        let e = endpoint("https://127.0.0.1:1", &client).unwrap_err();
        assert!(
            format!("{e:#}").contains("--client-cert agent.pem"),
            "{e:#}"
        );
    }

    #[test]
    fn statuses_print_as_code_and_message() {
        let e = anyhow::Error::from(Status::not_found("request 12 not found"));
        assert_eq!(error_line(&e), "NOT_FOUND: request 12 not found");
        let e = anyhow::Error::from(Status::invalid_argument("spec.duration_ms:\nmust be > 0"))
            .context("submitting");
        assert_eq!(
            error_line(&e),
            "submitting: INVALID_ARGUMENT: spec.duration_ms: must be > 0"
        );
    }

    #[test]
    fn missing_credentials_say_how_to_pass_a_token() {
        let dir = std::env::temp_dir().join(format!("suanli-cli-test-{}", std::process::id()));
        let e = identity(&args(None, None, &dir), Role::Operator).unwrap_err();
        let line = error_line(&e);
        assert!(line.contains("--token"), "{line}");
        assert!(line.contains("credentials.toml not found"), "{line}");
        assert!(!line.contains('\n'));
        // A token given on the command line needs no file.
        let id = identity(&args(Some("t0"), Some("acme"), &dir), Role::Tenant).unwrap();
        assert_eq!(id.token, "t0");
        assert_eq!(id.tenant.as_deref(), Some("acme"));
    }

    #[test]
    fn credentials_pick_the_token_of_the_role() {
        let dir = std::env::temp_dir().join(format!("suanli-cli-creds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let creds = Credentials {
            operator: "op".into(),
            tenants: vec![
                credentials::TenantToken {
                    name: "acme".into(),
                    token: "ta".into(),
                },
                credentials::TenantToken {
                    name: "zeta".into(),
                    token: "tz".into(),
                },
            ],
            agents: vec![credentials::AgentToken {
                pool: "futian-aicc".into(),
                token: "ag".into(),
            }],
        };
        creds.save(&dir.join(credentials::FILE_NAME)).unwrap();
        let token = |tenant: Option<&str>, role| identity(&args(None, tenant, &dir), role);
        assert_eq!(token(None, Role::Operator).unwrap().token, "op");
        let first = token(None, Role::Tenant).unwrap();
        assert_eq!(
            (first.token.as_str(), first.tenant.as_deref()),
            ("ta", Some("acme"))
        );
        assert_eq!(token(Some("zeta"), Role::Tenant).unwrap().token, "tz");
        assert!(error_line(&token(Some("nope"), Role::Tenant).unwrap_err()).contains("acme, zeta"));
        assert_eq!(token(None, Role::Agent("futian-aicc")).unwrap().token, "ag");
        assert!(token(None, Role::Agent("other")).is_err());
        // A tenant token given on the command line is recognised by the file.
        let id = identity(&args(Some("tz"), None, &dir), Role::Tenant).unwrap();
        assert_eq!(id.tenant.as_deref(), Some("zeta"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bearer_headers() {
        assert_eq!(Bearer::new("abc").unwrap().value().unwrap(), "Bearer abc");
        assert_eq!(
            Bearer::new("Bearer abc").unwrap().value().unwrap(),
            "Bearer abc"
        );
        assert!(Bearer::new("a\nb").is_err());
    }
}
