//! `suanli serve`: runs the broker until SIGINT or SIGTERM, and the logging every long-running
//! command shares.

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;
use tracing_subscriber::EnvFilter;

/// `suanli serve`.
#[derive(Args, Clone, Debug)]
pub struct ServeArgs {
    /// gRPC listen address [default: 127.0.0.1:50051].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// HTTP listen address for metrics, health and the operator console, or `off`
    /// [default: 127.0.0.1:8080].
    #[arg(long, value_name = "ADDR|off", value_parser = parse_http)]
    pub http: Option<HttpListen>,
    /// Fleet file [default: the built-in futian-2024 fleet].
    #[arg(long, value_name = "FILE")]
    pub fleet: Option<PathBuf>,
    /// Configuration file (TOML).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Run as one replica of a group on this etcd cluster (comma-separated URLs) instead of
    /// on the data folder's own log.
    #[arg(long, value_name = "URL,...", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// In a group: the gRPC address (host:port) clients are sent to when this replica leads
    /// [default: the listen address].
    #[arg(long, value_name = "HOST:PORT")]
    pub advertise: Option<String>,
}

/// `--http`: an address, or `off`.
#[derive(Clone, Copy, Debug)]
pub struct HttpListen(pub Option<SocketAddr>);

fn parse_http(s: &str) -> Result<HttpListen, String> {
    if s == "off" {
        return Ok(HttpListen(None));
    }
    s.parse()
        .map(|a| HttpListen(Some(a)))
        .map_err(|e| format!("{e}: an address such as 127.0.0.1:8080, or off"))
}

/// Sends logs to stderr, as text or JSON lines, filtered by `RUST_LOG` (default: `default`).
pub fn init_logging(json: bool, default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Completes on the first SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!("cannot listen for Ctrl-C: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => tracing::info!("SIGINT received, shutting down"),
        () = terminate => tracing::info!("SIGTERM received, shutting down"),
    }
}

/// Runs the broker until a signal asks it to stop. A second signal ends the process at once,
/// without waiting for the graceful shutdown.
pub async fn run(a: &ServeArgs, data_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let opts = suanli_broker::ServeOptions {
        listen: a.listen,
        http: a.http.map(|h| h.0),
        data_dir,
        fleet: a.fleet.clone(),
        config: a.config.clone(),
        etcd: a.etcd.clone(),
        advertise: a.advertise.clone(),
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(());
        shutdown_signal().await;
        tracing::warn!("second signal: exiting without waiting for the graceful shutdown");
        std::process::exit(130);
    });
    let shutdown = async move {
        // A dropped sender (the signal task ended) also means stop.
        let _ = stop_rx.await;
    };
    suanli_broker::serve(opts, shutdown)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    tracing::info!("broker stopped");
    Ok(())
}
