//! A real etcd cluster on loopback for the tests: members on free ports in a temporary
//! folder, started and stopped by PID. Needs the `etcd` binary (Debian's `etcd-server`); where
//! it is missing the tests are skipped with a message, unless `SUANLI_REQUIRE_ETCD=1`, which
//! turns the skip into a failure.

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One member.
struct Member {
    name: String,
    client: u16,
    peer: u16,
    child: Option<Child>,
}

/// A running etcd cluster, killed when dropped.
pub struct EtcdCluster {
    members: Vec<Member>,
    dir: tempfile::TempDir,
    initial_cluster: String,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn etcd_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("etcd"))
        .find(|p| p.is_file())
}

/// A plain HTTP/1.1 request to etcd's JSON gateway; the body of the answer.
fn http(port: u16, method: &str, path: &str, body: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

impl EtcdCluster {
    /// Starts an `n`-member cluster and waits until it has a leader; `None` (after saying
    /// why) where etcd is not installed and not required.
    pub fn start_or_skip(n: usize) -> Option<Self> {
        let Some(_) = etcd_binary() else {
            if std::env::var("SUANLI_REQUIRE_ETCD").as_deref() == Ok("1") {
                panic!("SUANLI_REQUIRE_ETCD=1 but no etcd binary on PATH (Debian: etcd-server)");
            }
            eprintln!(
                "skipped: no etcd binary on PATH (install Debian's etcd-server, or set \
                 SUANLI_REQUIRE_ETCD=1 to make this a failure)"
            );
            return None;
        };
        // A port found free can be taken (by another test's outgoing connection) before etcd
        // binds it; a member that lost the race exits, and a cluster of two out of three would
        // lose its quorum with the first kill. So every member must answer, or all start again
        // on other ports.
        for attempt in 1..=5 {
            let mut cluster = Self::start_on_free_ports(n);
            match cluster.wait_for_every_member() {
                Ok(()) => return Some(cluster),
                Err(why) => eprintln!("etcd cluster, attempt {attempt}: {why}; starting again"),
            }
        }
        panic!("an etcd cluster of {n} did not start in 5 attempts");
    }

    fn start_on_free_ports(n: usize) -> Self {
        let mut ports = std::collections::BTreeSet::new();
        while ports.len() < 2 * n {
            ports.insert(free_port());
        }
        let mut ports = ports.into_iter();
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: ports.next().unwrap(),
                peer: ports.next().unwrap(),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster {
            members,
            dir: tempfile::tempdir().expect("a temporary folder"),
            initial_cluster,
        };
        for i in 0..n {
            cluster.start_member(i);
        }
        cluster
    }

    /// Waits until every member runs and answers, and the cluster has a leader.
    fn wait_for_every_member(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            for (i, m) in self.members.iter_mut().enumerate() {
                if let Some(Ok(Some(status))) = m.child.as_mut().map(|c| c.try_wait()) {
                    m.child = None;
                    return Err(format!(
                        "member {i} exited ({status})\n{}",
                        self.log_tails(5)
                    ));
                }
            }
            let answering = self
                .members
                .iter()
                .filter(|m| http(m.client, "POST", "/v3/maintenance/status", "{}").is_some())
                .count();
            if answering == self.members.len() && self.leader().is_some() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{answering} of {} members answer after 30 s\n{}",
                    self.members.len(),
                    self.log_tails(5)
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn start_member(&mut self, i: usize) {
        let data = self.dir.path().join(&self.members[i].name);
        let log = std::fs::File::create(self.dir.path().join(format!("m{i}.log"))).unwrap();
        let m = &mut self.members[i];
        let client = format!("http://127.0.0.1:{}", m.client);
        let peer = format!("http://127.0.0.1:{}", m.peer);
        let child = Command::new("etcd")
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "suanli-test"])
            // Loopback: shorter heartbeats and elections than across machines.
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etcd");
        m.child = Some(child);
    }

    /// The client URLs, comma-separated, as `--etcd` takes them.
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.client))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The index of the member that leads, as the members that answer see it.
    pub fn leader(&self) -> Option<usize> {
        for m in self.members.iter().filter(|m| m.child.is_some()) {
            let Some(status) = http(m.client, "POST", "/v3/maintenance/status", "{}") else {
                continue;
            };
            let field = |name: &str| {
                let at = status.find(&format!("\"{name}\":\""))? + name.len() + 4;
                Some(status[at..].split('"').next()?.to_string())
            };
            let (Some(leader), Some(me)) = (field("leader"), field("member_id")) else {
                continue;
            };
            if leader == me {
                return self.members.iter().position(|x| x.client == m.client);
            }
            // Another member leads: find it by asking each for its own id.
            for (i, other) in self.members.iter().enumerate() {
                if other.child.is_none() {
                    continue;
                }
                if let Some(s) = http(other.client, "POST", "/v3/maintenance/status", "{}")
                    && s.contains(&format!("\"member_id\":\"{leader}\""))
                {
                    return Some(i);
                }
            }
        }
        None
    }

    /// Waits until the members that run have a leader.
    pub fn wait_for_leader(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(i) = self.leader() {
                return i;
            }
            assert!(
                Instant::now() < deadline,
                "etcd has no leader after 60 s; the members' last log lines:\n{}",
                self.log_tails(20)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last `n` lines of every member's log, for a failure's message: the temporary
    /// folder that holds them is gone once the test has failed.
    fn log_tails(&self, n: usize) -> String {
        let mut out = String::new();
        for (i, m) in self.members.iter().enumerate() {
            let state = if m.child.is_some() {
                "running"
            } else {
                "stopped"
            };
            out.push_str(&format!("--- member {i} ({state})\n"));
            let log = std::fs::read_to_string(self.dir.path().join(format!("m{i}.log")))
                .unwrap_or_else(|e| format!("(no log: {e})"));
            let lines: Vec<&str> = log.lines().collect();
            for line in &lines[lines.len().saturating_sub(n)..] {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    /// Whether `key` exists, read through etcd's JSON gateway.
    pub fn has_key(&self, key: &str) -> bool {
        let body = format!(
            "{{\"key\":\"{}\",\"count_only\":true}}",
            base64(key.as_bytes())
        );
        for m in self.members.iter().filter(|m| m.child.is_some()) {
            if let Some(answer) = http(m.client, "POST", "/v3/kv/range", &body) {
                return answer.contains("\"count\":\"1\"");
            }
        }
        panic!("no etcd member answered a range of {key}")
    }

    /// SIGKILLs member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again on its data.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        let data = self.dir.path().join(&self.members[i].name);
        assert!(data.exists(), "member {i} has no data to restart from");
        self.start_member(i);
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// Standard base64 with padding, as etcd's JSON gateway takes keys.
fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
