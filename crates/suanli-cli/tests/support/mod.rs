//! Running the real `suanli` binary: a broker on a free port, and its credentials.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use suanli_broker::credentials::{Credentials, FILE_NAME};

/// A running `suanli serve`, killed (SIGKILL) when dropped, so a failing test leaves no broker
/// behind.
pub struct Serving(Child);

impl Serving {
    /// Kills the broker with SIGKILL and reaps it.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// Its process id.
    #[allow(dead_code)] // not every test binary that shares this module uses it
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Whether it has not exited.
    #[allow(dead_code)] // not every test binary that shares this module uses it
    pub fn is_running(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }

    /// Waits for it to exit by itself.
    #[allow(dead_code)] // not every test binary that shares this module uses it
    pub fn wait(&mut self) -> std::process::ExitStatus {
        self.0.wait().expect("wait for suanli serve")
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `suanli serve` on a free port; returns it and its address. Snapshots are taken every
/// few entries, so a kill also lands around snapshots and log truncation.
#[allow(dead_code)] // not every test binary that shares this module uses it
pub fn start(dir: &Path) -> (Serving, String) {
    start_with(
        dir,
        "snapshot_every = 40\n[pools]\nsimulated = [\"*\"]\n",
        &[],
    )
}

/// Starts `suanli serve` as [`start`] does, with `config` as its configuration file and
/// `args` added to its command line.
#[allow(dead_code)] // not every test binary that shares this module uses it
pub fn start_with(dir: &Path, config_text: &str, args: &[&str]) -> (Serving, String) {
    start_listening(dir, config_text, "127.0.0.1:0", args)
}

/// Starts `suanli serve` as [`start_with`] does, listening on `listen` (a test that restarts
/// the broker on the port it had keeps its clients' and agents' address).
#[allow(dead_code)] // not every test binary that shares this module uses it
pub fn start_listening(
    dir: &Path,
    config_text: &str,
    listen: &str,
    args: &[&str],
) -> (Serving, String) {
    // A restart keeps the credentials file: the broker keeps only hashes of the tokens in it.
    let config = dir.join("broker.toml");
    std::fs::write(&config, config_text).expect("write the config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_suanli"))
        .args(["serve", "--listen", listen, "--http", "off", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(log_file())
        .spawn()
        .expect("start suanli serve");
    let mut first = String::new();
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    out.read_line(&mut first).expect("banner");
    // Keep draining its output: a closed pipe would end the broker at its next line.
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    // "suanli broker: gRPC on 127.0.0.1:PORT, fleet ..."
    let addr = first
        .split("gRPC on ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or_else(|| panic!("unexpected banner {first:?}"))
        .to_string();
    (Serving(child), addr)
}

/// Where a daemon's log goes: appended to the file `SUANLI_TEST_LOG` names, to look into a
/// failure; nowhere by default.
#[allow(dead_code)] // not every test binary that shares this module uses it
pub fn log_file() -> Stdio {
    match std::env::var_os("SUANLI_TEST_LOG") {
        Some(path) => std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_or_else(|_| Stdio::null(), Stdio::from),
        None => Stdio::null(),
    }
}

#[allow(dead_code)] // not every test binary that shares this module uses it
pub async fn wait_for_credentials(dir: &Path) -> Credentials {
    for _ in 0..1000 {
        if let Ok(c) = Credentials::load(&dir.join(FILE_NAME)) {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no credentials file")
}

/// A gRPC channel to the broker at `addr`, retried while it starts.
#[allow(dead_code)] // not every test binary that shares this module uses it
pub async fn channel(addr: &str) -> tonic::transport::Channel {
    for _ in 0..500 {
        if let Ok(c) = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
        {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("cannot connect to {addr}")
}

/// `msg` as a call carrying `token`.
#[allow(dead_code)] // not every test binary that shares this module uses it
pub fn with_token<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

/// Every request of the tenant whose `token` is given, page by page.
#[allow(dead_code)] // not every test binary that shares this module uses it
pub async fn all_requests(
    tenant: &mut suanli_proto::v1::tenant_service_client::TenantServiceClient<
        tonic::transport::Channel,
    >,
    token: &str,
) -> Vec<suanli_proto::v1::Request> {
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let req = suanli_proto::v1::ListRequestsRequest {
            page_size: 1000,
            page_token,
            states: vec![],
        };
        let page = tenant
            .list_requests(with_token(req, token))
            .await
            .expect("list requests")
            .into_inner();
        all.extend(page.requests);
        if page.next_page_token.is_empty() {
            return all;
        }
        page_token = page.next_page_token;
    }
}
