//! Broker configuration: the zero-config default (the Futian 2024 fleet on simulated execution,
//! development tenants) and the TOML file that changes it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use suanli_core::fleet::FUTIAN_2024;
use suanli_core::{Catalogue, EngineConfig, Fleet, Policy, TFLOPS_PER_P, TenantSpec};

use crate::admission::Limit;
use crate::error::BrokerError;

/// How a pool's leases are carried out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Execution {
    /// The broker itself starts each lease at once and finishes it after its duration
    /// (divided by the speed-up). For demonstrations and the zero-config default.
    Simulated,
    /// A pool agent connects over `PoolService.ConnectAgent`, is told which leases to start
    /// and stop, and reports them; a missing heartbeat makes the pool lost.
    Agent,
}

/// A configured tenant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantConfig {
    /// Quota, borrowing limit and weight.
    pub spec: TenantSpec,
    /// Its token; generated when absent.
    pub token: Option<String>,
}

/// Everything the broker needs to run.
#[derive(Clone, Debug)]
pub struct BrokerConfig {
    /// Data folder: the store and the credentials file.
    pub data_dir: PathBuf,
    /// The fleet registered at first start (pools missing from the log are registered later).
    pub fleet: Fleet,
    /// Engine settings (default placement policy).
    pub engine: EngineConfig,
    /// Pools carried out by agents; every other pool is simulated.
    pub agent_pools: Vec<String>,
    /// Whether every pool is simulated unless named in `agent_pools`.
    pub simulate_others: bool,
    /// Simulated leases finish after duration / speedup.
    pub simulated_speedup: f64,
    /// Tenants set at start.
    pub tenants: Vec<TenantConfig>,
    /// The operator's token; generated when absent.
    pub operator_token: Option<String>,
    /// How often the engine ticks (expiry and scheduling) when it has nothing to schedule;
    /// while it has (requests queued, capacity freed, a pass under way) it ticks within a few
    /// milliseconds.
    pub tick_interval: Duration,
    /// A pool whose agent is silent this long is lost.
    pub heartbeat_timeout: Duration,
    /// Heartbeat interval told to agents.
    pub heartbeat_interval: Duration,
    /// Commands that may wait for the writer; beyond that, RESOURCE_EXHAUSTED.
    pub queue_capacity: usize,
    /// Largest incoming message.
    pub max_message_bytes: usize,
    /// TLS certificate and key (PEM files), when TLS is wanted.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// With TLS: the CA (PEM) whose client certificates identify pools' agents (mutual
    /// TLS; see [`crate::auth::pool_of_certificate`]). Other callers need no certificate.
    pub agent_ca: Option<PathBuf>,
    /// The district's capacity target, shown in the fleet summary.
    pub target_tflops: u64,
    /// Where to listen.
    pub listen: SocketAddr,
    /// Where the HTTP side (metrics, health, the operator console) listens; `None` turns it
    /// off.
    pub http: Option<SocketAddr>,
    /// Whether `/metrics`, `/healthz` and `/readyz` answer without the operator's token (for a
    /// Prometheus on the same machine); the console always needs it.
    pub http_open_metrics: bool,
    /// Print the credentials at start-up (for a person starting the broker by hand).
    pub announce: bool,
    /// How long an ended request stays readable (GetRequest, ListRequests) after it ended.
    pub ended_retention: Duration,
    /// Most ended requests kept readable; the oldest are forgotten first.
    pub ended_max: usize,
    /// How long open calls may take to finish after a stop is asked for.
    pub shutdown_grace: Duration,
    /// Log entries between snapshots: recovery loads the latest snapshot and replays only the
    /// entries after it, and the log before it is dropped. Taking one stalls the writer for
    /// the clone of its state (45 ms with 150,000 requests), so not too often: at the broker's
    /// peak of about 20,000 entries a second, every 25 s.
    pub snapshot_every: u64,
    /// The etcd cluster of a replicated group (see [`crate::ha`]); empty: a broker on its
    /// own, with its log in the data folder.
    pub etcd: Vec<String>,
    /// The prefix of the group's keys in etcd (several groups may share one cluster).
    pub etcd_prefix: String,
    /// The gRPC address clients are sent to when this replica leads; by default the listen
    /// address.
    pub advertise: Option<String>,
    /// Per-tenant rates in front of the writer (see [`crate::admission`]); none by default.
    pub admission: crate::admission::AdmissionConfig,
    /// Most requests one tenant may have waiting; its submissions beyond are
    /// RESOURCE_EXHAUSTED.
    pub max_waiting_per_tenant: u64,
    /// Most requests waiting in all; submissions beyond are RESOURCE_EXHAUSTED. Each waiting
    /// request costs a few KiB (its record, the engine's entry, the views), so this bounds
    /// the memory an overload can take.
    pub max_waiting: u64,
}

impl BrokerConfig {
    /// The zero-config broker: futian-2024 on simulated execution, four development tenants,
    /// data in `./suanli-data`, gRPC on 127.0.0.1:50051.
    pub fn dev_default() -> Self {
        let fleet = Fleet::from_toml(FUTIAN_2024, &Catalogue::builtin())
            .expect("the built-in fleet is valid (tested in suanli-core)");
        let tenant = |name: &str, quota_p: u64, weight: u32| TenantConfig {
            spec: TenantSpec {
                name: name.into(),
                quota_tflops: quota_p * TFLOPS_PER_P,
                borrow_limit_tflops: None,
                weight,
            },
            token: None,
        };
        BrokerConfig {
            data_dir: PathBuf::from("suanli-data"),
            fleet,
            engine: EngineConfig::default(),
            agent_pools: Vec::new(),
            simulate_others: true,
            simulated_speedup: 1.0,
            tenants: vec![
                tenant("tenant-a", 2000, 2),
                tenant("tenant-b", 1000, 1),
                tenant("tenant-c", 1000, 1),
                tenant("tenant-d", 500, 1),
            ],
            operator_token: None,
            tick_interval: Duration::from_millis(100),
            heartbeat_timeout: Duration::from_secs(15),
            heartbeat_interval: Duration::from_secs(3),
            queue_capacity: 65_536,
            max_message_bytes: 1 << 20,
            tls: None,
            agent_ca: None,
            target_tflops: 20_000 * TFLOPS_PER_P,
            listen: "127.0.0.1:50051".parse().expect("address"),
            http: Some("127.0.0.1:8080".parse().expect("address")),
            http_open_metrics: true,
            announce: false,
            ended_retention: Duration::from_secs(24 * 3600),
            ended_max: 200_000,
            snapshot_every: 500_000,
            shutdown_grace: Duration::from_secs(5),
            etcd: Vec::new(),
            etcd_prefix: "/suanli/".into(),
            advertise: None,
            admission: Default::default(),
            max_waiting_per_tenant: 50_000,
            max_waiting: 200_000,
        }
    }

    /// How a pool's leases run.
    pub fn execution(&self, pool: &str) -> Option<Execution> {
        if self.agent_pools.iter().any(|p| p == pool) {
            Some(Execution::Agent)
        } else if self.simulate_others {
            Some(Execution::Simulated)
        } else {
            None
        }
    }

    /// Reads a configuration file over the defaults. Relative paths are taken from the file's
    /// folder.
    pub fn from_file(path: &Path) -> Result<Self, BrokerError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| BrokerError::Config(format!("config {}: {e}", path.display())))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_toml(&text, base)
            .map_err(|e| BrokerError::Config(format!("config {}: {e}", path.display())))
    }

    /// Parses a configuration over the defaults.
    pub fn from_toml(text: &str, base: &Path) -> Result<Self, String> {
        let file: ConfigFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut c = BrokerConfig::dev_default();
        if let Some(l) = file.listen {
            c.listen = l.parse().map_err(|e| format!("field listen: {e}"))?;
        }
        if let Some(h) = file.http {
            c.http = match h.as_str() {
                "off" => None,
                addr => Some(
                    addr.parse()
                        .map_err(|e| format!("field http: {e} (an address, or \"off\")"))?,
                ),
            };
        }
        if let Some(open) = file.http_open_metrics {
            c.http_open_metrics = open;
        }
        if let Some(d) = file.data_dir {
            c.data_dir = base.join(d);
        }
        if let Some(f) = file.fleet {
            c.fleet = load_fleet(&base.join(f))?;
        }
        if let Some(p) = file.default_policy {
            c.engine.default_policy = Policy::from_name(&p).ok_or_else(|| {
                format!("field default_policy: {p:?} is not cheapest, cheapest_after_subsidy, lowest_latency or best_fit")
            })?;
        }
        let pools = file.pools.unwrap_or_default();
        match pools.simulated.as_slice() {
            [] => c.simulate_others = false,
            [one] if one == "*" => c.simulate_others = true,
            listed => {
                // Only the listed pools are simulated; every other pool joins through its agent.
                c.simulate_others = false;
                c.agent_pools = c
                    .fleet
                    .pools
                    .iter()
                    .map(|p| p.id.clone())
                    .filter(|id| !listed.contains(id))
                    .collect();
            }
        }
        if !pools.agent.is_empty() {
            c.agent_pools = pools.agent;
        }
        if !c.simulate_others {
            // Every pool must be stated: simulated or agent. Nothing is simulated silently.
            let listed = |id: &String| pools.simulated.contains(id) || c.agent_pools.contains(id);
            if let Some(p) = c.fleet.pools.iter().find(|p| !listed(&p.id)) {
                return Err(format!(
                    "pool {} is neither in pools.simulated nor in pools.agent",
                    p.id
                ));
            }
        }
        if let Some(s) = pools.simulated_speedup {
            if !(s.is_finite() && s >= 1.0) {
                return Err("field pools.simulated_speedup: must be at least 1".into());
            }
            c.simulated_speedup = s;
        }
        if let Some(a) = file.admission {
            c.admission.default =
                Some(Limit::new(a.rate, a.burst).map_err(|e| format!("field admission: {e}"))?);
        }
        if let Some(t) = &file.tenant {
            for t in t {
                match (t.rate, t.burst) {
                    (Some(rate), burst) => {
                        let limit = Limit::new(rate, burst)
                            .map_err(|e| format!("tenant {}: field rate: {e}", t.name))?;
                        c.admission.tenants.insert(t.name.clone(), limit);
                    }
                    (None, Some(_)) => {
                        return Err(format!("tenant {}: field burst needs a rate", t.name));
                    }
                    (None, None) => {}
                }
            }
        }
        if let Some(t) = file.tenant {
            c.tenants = t
                .into_iter()
                .map(|t| TenantConfig {
                    spec: TenantSpec {
                        name: t.name,
                        quota_tflops: t.quota_tflops,
                        borrow_limit_tflops: t.borrow_limit_tflops,
                        weight: t.weight.unwrap_or(1),
                    },
                    token: t.token,
                })
                .collect();
        }
        c.operator_token = file.operator_token;
        if let Some(f) = file.operator_token_file {
            if c.operator_token.is_some() {
                return Err("fields operator_token and operator_token_file: give one".into());
            }
            let path = base.join(f);
            let token = std::fs::read_to_string(&path)
                .map_err(|e| format!("field operator_token_file: {}: {e}", path.display()))?;
            let token = token.trim();
            if token.is_empty() {
                return Err(format!(
                    "field operator_token_file: {} is empty",
                    path.display()
                ));
            }
            if token.starts_with("REPLACE-ME") {
                return Err(format!(
                    "field operator_token_file: {} still holds the placeholder of \
                     deploy/kubernetes/secret.yaml: put a secret token there",
                    path.display()
                ));
            }
            c.operator_token = Some(token.to_string());
        }
        if let Some(e) = file.etcd {
            c.etcd = e;
        }
        if let Some(p) = file.etcd_prefix {
            if !p.starts_with('/') || !p.ends_with('/') {
                return Err(format!(
                    "field etcd_prefix: {p:?} must start and end with /"
                ));
            }
            c.etcd_prefix = p;
        }
        c.advertise = file.advertise;
        if let Some(ms) = file.tick_interval_ms {
            c.tick_interval = Duration::from_millis(ms.max(1));
        }
        if let Some(ms) = file.heartbeat_timeout_ms {
            c.heartbeat_timeout = Duration::from_millis(ms.max(1));
        }
        if let Some(n) = file.max_waiting_per_tenant {
            c.max_waiting_per_tenant = n;
        }
        if let Some(n) = file.max_waiting {
            c.max_waiting = n;
        }
        if let Some(n) = file.max_in_flight {
            if n == 0 {
                return Err("field max_in_flight: must be at least 1".into());
            }
            c.admission.max_in_flight = n;
        }
        if let Some(n) = file.queue_capacity {
            c.queue_capacity = n.max(1);
        }
        if let Some(h) = file.ended_retention_hours {
            c.ended_retention = Duration::from_secs(h * 3600);
        }
        if let Some(n) = file.ended_max {
            c.ended_max = n;
        }
        if let Some(n) = file.snapshot_every {
            if n == 0 {
                return Err("field snapshot_every: must be at least 1".into());
            }
            c.snapshot_every = n;
        }
        if let Some(tls) = file.tls {
            c.tls = Some((base.join(tls.cert), base.join(tls.key)));
            c.agent_ca = tls.agent_ca.map(|ca| base.join(ca));
        }
        Ok(c)
    }
}

/// Reads a fleet file.
pub fn load_fleet(path: &Path) -> Result<Fleet, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("fleet {}: {e}", path.display()))?;
    Fleet::from_toml(&text, &Catalogue::builtin())
        .map_err(|e| format!("fleet {}: {e}", path.display()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    listen: Option<String>,
    http: Option<String>,
    http_open_metrics: Option<bool>,
    data_dir: Option<String>,
    fleet: Option<String>,
    default_policy: Option<String>,
    operator_token: Option<String>,
    tick_interval_ms: Option<u64>,
    heartbeat_timeout_ms: Option<u64>,
    queue_capacity: Option<usize>,
    ended_retention_hours: Option<u64>,
    ended_max: Option<usize>,
    snapshot_every: Option<u64>,
    operator_token_file: Option<String>,
    etcd: Option<Vec<String>>,
    etcd_prefix: Option<String>,
    advertise: Option<String>,
    pools: Option<PoolsFile>,
    tenant: Option<Vec<TenantFile>>,
    tls: Option<TlsFile>,
    admission: Option<AdmissionFile>,
    max_waiting_per_tenant: Option<u64>,
    max_waiting: Option<u64>,
    max_in_flight: Option<usize>,
}

/// `[admission]`: every tenant's rate, unless its own `[[tenant]]` gives one.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdmissionFile {
    rate: f64,
    burst: Option<f64>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolsFile {
    #[serde(default)]
    simulated: Vec<String>,
    #[serde(default)]
    agent: Vec<String>,
    simulated_speedup: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantFile {
    name: String,
    quota_tflops: u64,
    borrow_limit_tflops: Option<u64>,
    weight: Option<u32>,
    token: Option<String>,
    rate: Option<f64>,
    burst: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    cert: String,
    key: String,
    agent_ca: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants_rates_come_from_admission_and_their_own_entries() {
        let c = BrokerConfig::from_toml(
            "[pools]\nsimulated = [\"*\"]\n[admission]\nrate = 100\n\
             [[tenant]]\nname = \"flood\"\nquota_tflops = 1\nrate = 10\nburst = 50\n\
             [[tenant]]\nname = \"plain\"\nquota_tflops = 1\n",
            Path::new("."),
        )
        .unwrap();
        let limit = |t: &str| c.admission.limit(t).unwrap();
        assert_eq!((limit("flood").rate, limit("flood").burst), (10.0, 50.0));
        assert_eq!((limit("plain").rate, limit("plain").burst), (100.0, 200.0));
        assert_eq!(limit("made-later").rate, 100.0);
        assert!(
            BrokerConfig::dev_default()
                .admission
                .limit("tenant-a")
                .is_none()
        );
        let err = |text: &str| {
            let text = format!("[pools]\nsimulated = [\"*\"]\n{text}");
            BrokerConfig::from_toml(&text, Path::new(".")).unwrap_err()
        };
        assert!(err("[admission]\nrate = 0\n").contains("field admission"));
        let e = err("[[tenant]]\nname = \"x\"\nquota_tflops = 1\nburst = 5\n");
        assert!(e.contains("tenant x: field burst needs a rate"), "{e}");
        // Top-level keys come before the first table.
        let in_flight = |n: u64| {
            let text = format!("max_in_flight = {n}\n[pools]\nsimulated = [\"*\"]\n");
            BrokerConfig::from_toml(&text, Path::new("."))
        };
        let e = in_flight(0).unwrap_err();
        assert!(e.contains("field max_in_flight"), "{e}");
        assert_eq!(in_flight(64).unwrap().admission.max_in_flight, 64);
        assert_eq!(BrokerConfig::dev_default().admission.max_in_flight, 4096);
    }

    #[test]
    fn every_pool_must_be_stated_when_not_all_are_simulated() {
        let e = BrokerConfig::from_toml("[pools]\nagent = [\"futian-aicc\"]\n", Path::new("."))
            .unwrap_err();
        assert!(
            e.contains("is neither in pools.simulated nor in pools.agent"),
            "{e}"
        );
        let c = BrokerConfig::from_toml("[pools]\nsimulated = [\"*\"]\n", Path::new(".")).unwrap();
        assert_eq!(c.execution("futian-aicc"), Some(Execution::Simulated));
    }

    #[test]
    fn the_example_configuration_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/broker.example.toml");
        let c = BrokerConfig::from_file(&path).unwrap();
        assert_eq!(c.execution("futian-aicc"), Some(Execution::Agent));
        assert_eq!(c.execution("futian-cloud"), Some(Execution::Simulated));
        assert_eq!(c.tenants.len(), 2);
        assert_eq!(c.simulated_speedup, 60.0);
    }

    #[test]
    fn unknown_keys_and_bad_policies_are_named() {
        let e = BrokerConfig::from_toml("bogus = 1\n", Path::new(".")).unwrap_err();
        assert!(e.contains("bogus"), "{e}");
        let e =
            BrokerConfig::from_toml("default_policy = \"fastest\"\n", Path::new(".")).unwrap_err();
        assert!(e.contains("default_policy"), "{e}");
        let e = BrokerConfig::from_toml(
            "snapshot_every = 0\n[pools]\nsimulated = [\"*\"]\n",
            Path::new("."),
        )
        .unwrap_err();
        assert!(e.contains("field snapshot_every"), "{e}");
    }

    #[test]
    fn the_http_address_is_an_address_or_off() {
        let pools = "[pools]\nsimulated = [\"*\"]\n";
        let e = BrokerConfig::from_toml("http = \"localhost\"\n", Path::new(".")).unwrap_err();
        assert!(e.starts_with("field http:"), "{e}");
        let c =
            BrokerConfig::from_toml(&format!("http = \"off\"\n{pools}"), Path::new(".")).unwrap();
        assert_eq!(c.http, None);
        let c = BrokerConfig::from_toml(
            &format!("http = \"127.0.0.1:9090\"\n{pools}"),
            Path::new("."),
        )
        .unwrap();
        assert_eq!(c.http, Some("127.0.0.1:9090".parse().unwrap()));
    }

    #[test]
    fn a_group_is_configured_with_etcd_an_advertised_address_and_a_token_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "s3cret-operator-token\n").unwrap();
        let c = BrokerConfig::from_toml(
            "etcd = [\"http://10.0.0.1:2379\", \"http://10.0.0.2:2379\"]\n\
             etcd_prefix = \"/district/\"\n\
             advertise = \"broker-0.peers:50051\"\n\
             operator_token_file = \"token\"\n\
             [pools]\nsimulated = [\"*\"]\n",
            dir.path(),
        )
        .unwrap();
        assert_eq!(c.etcd.len(), 2);
        assert_eq!(c.etcd_prefix, "/district/");
        assert_eq!(c.advertise.as_deref(), Some("broker-0.peers:50051"));
        assert_eq!(c.operator_token.as_deref(), Some("s3cret-operator-token"));

        let err = |text: &str| {
            let text = format!("{text}\n[pools]\nsimulated = [\"*\"]\n");
            BrokerConfig::from_toml(&text, dir.path()).unwrap_err()
        };
        assert!(err("etcd_prefix = \"suanli\"").contains("field etcd_prefix"));
        assert!(err("operator_token_file = \"missing\"").contains("field operator_token_file"));
        let both = "operator_token = \"a\"\noperator_token_file = \"token\"";
        assert!(err(both).contains("give one"));
        std::fs::write(dir.path().join("placeholder"), "REPLACE-ME-x").unwrap();
        assert!(err("operator_token_file = \"placeholder\"").contains("placeholder"));
    }
}
