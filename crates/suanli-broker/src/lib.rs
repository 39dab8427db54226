//! The suanli broker: the allocation engine of `suanli-core` behind gRPC.
//!
//! AI companies (tenants), pool agents and operators talk to it over the `suanli.v1` API. One
//! thread (the writer) owns the engine and applies commands in batches; each batch is made
//! durable in the command log (one sync per batch) before any of its callers is answered, and
//! queries read published views without waiting for the writer.
//!
//! # Layout
//! - [`server`]: start-up (recovery, fleet, tenants, tokens) and the gRPC server.
//! - `writer`: the engine's thread: batches, group commit, simulated execution, agents, ticks.
//! - [`store`]: the durable command log and snapshots behind a trait (redb by default);
//!   `snapshot`: what a snapshot holds, saved off the writer's thread.
//! - `ha`: several brokers on one etcd cluster: the election, the log in etcd, followers
//!   that apply it.
//! - `views`: what queries read.
//! - [`billing`]: vouchers, budgets and settlement in the writer, derived from the command log.
//! - `service`: the three gRPC services; [`convert`]: messages to core types and back.
//! - [`http`]: the HTTP side: health, metrics and the operator console.
//! - `metrics`: the Prometheus metrics `/metrics` serves: the fleet read from the views at
//!   scrape time, the writer's counters and timings, gRPC calls by method and code.
//! - `console`: the operator console's page (embedded in the binary) and its JSON views,
//!   behind the operator's token.
//! - [`auth`]: bearer tokens and principals; [`error`]: the one mapping of errors to gRPC codes.
//! - [`config`], [`credentials`]: configuration and the credentials file.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admission;
pub mod auth;
pub mod config;
pub mod credentials;
pub mod error;
pub mod http;
pub mod server;
pub mod store;

pub mod billing;
mod console;
pub mod convert;
pub(crate) mod ha;
mod metrics;
mod relay;
mod service;
mod snapshot;
pub mod trail;
mod views;
mod writer;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;

pub use config::BrokerConfig;
pub use error::BrokerError;
pub use ha::{LEADER_METADATA, LEASE_TTL};
pub use server::{Listeners, RunSummary, recovered_digest, recovered_ledger, run, run_with};

/// What `suanli serve` was asked for on its command line.
#[derive(Clone, Debug, Default)]
pub struct ServeOptions {
    /// gRPC listen address; default 127.0.0.1:50051.
    pub listen: Option<SocketAddr>,
    /// HTTP listen address (metrics, health, console): `Some(None)` turns it off; default
    /// 127.0.0.1:8080.
    pub http: Option<Option<SocketAddr>>,
    /// Data folder (store and credentials); default `./suanli-data`.
    pub data_dir: Option<PathBuf>,
    /// Fleet file; default the built-in futian-2024.
    pub fleet: Option<PathBuf>,
    /// Configuration file (TOML).
    pub config: Option<PathBuf>,
    /// etcd endpoints: run as one replica of a group (empty: as the configuration says).
    pub etcd: Vec<String>,
    /// The address clients are sent to when this replica leads.
    pub advertise: Option<String>,
}

/// Starts a broker as `suanli serve` does: the configuration file or the zero-config default,
/// overridden by the options; prints where it listens and the credentials file; runs until
/// `shutdown` completes.
pub async fn serve(
    opts: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut config = match &opts.config {
        Some(path) => BrokerConfig::from_file(path)?,
        None => BrokerConfig::dev_default(),
    };
    if let Some(l) = opts.listen {
        config.listen = l;
    }
    if let Some(h) = opts.http {
        config.http = h;
    }
    if let Some(d) = opts.data_dir {
        config.data_dir = d;
    }
    if let Some(f) = opts.fleet {
        config.fleet = config::load_fleet(&f)?;
    }
    if !opts.etcd.is_empty() {
        config.etcd = opts.etcd;
    }
    if let Some(a) = opts.advertise {
        config.advertise = Some(a);
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("listen on {}: {e}", config.listen))?;
    let http = match config.http {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("http: listen on {addr}: {e}"))?,
        ),
        None => None,
    };
    // A group's credentials are in its log, which every replica reads: printed by none.
    config.announce = config.etcd.is_empty();
    let http_addr = match &http {
        // The login link with the operator's token follows with the credentials.
        Some(l) => format!("http://{}/ (login link below)", l.local_addr()?),
        None => "off".into(),
    };
    println!(
        "suanli broker: gRPC on {}, fleet {} ({} pools), data in {}, console {}",
        listener.local_addr()?,
        config.fleet.name,
        config.fleet.pools.len(),
        config.data_dir.display(),
        http_addr
    );
    let listeners = Listeners {
        grpc: listener,
        http,
    };
    let summary = run_with(listeners, config, shutdown).await?;
    println!(
        "suanli broker stopped cleanly (state digest {:016x})",
        summary.digest
    );
    Ok(())
}
