//! `suanli top --once` of the real binary against a real `suanli serve` with a known load: its
//! figures are those of `suanli fleet --json`, `pools --json`, `queue --json` and
//! `tenants --json`; against an address where nothing listens it shows the broker as
//! unreachable and exits with 1.

mod support;

use std::process::{Command, Output};

use serde_json::Value;
use support::{start, wait_for_credentials};

/// Runs `suanli --addr http://ADDR --token TOKEN ARGS...` with `env` set and no terminal size
/// inherited.
fn suanli_env(addr: &str, token: &str, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_suanli"));
    cmd.args(["--addr", &format!("http://{addr}"), "--token", token])
        .args(args)
        .env_remove("COLUMNS")
        .env_remove("LINES");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run suanli")
}

fn suanli(addr: &str, token: &str, args: &[&str]) -> Output {
    suanli_env(addr, token, &[], args)
}

/// Runs a command that must succeed and print one JSON object.
fn json(addr: &str, token: &str, args: &[&str]) -> Value {
    let out = suanli(addr, token, args);
    assert!(
        out.status.success(),
        "suanli {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "suanli {args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// TFLOPS in P with one decimal, as the tables print them.
fn p(tflops: &Value) -> String {
    let tenths = (tflops.as_u64().expect("a TFLOPS figure") + 50) / 100;
    format!("{}.{}", tenths / 10, tenths % 10)
}

/// The cells of the first line of `text` whose first cell is `first`.
fn row<'a>(text: &'a str, first: &str) -> Vec<&'a str> {
    text.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cells| cells.first() == Some(&first))
        .unwrap_or_else(|| panic!("no line starting with {first:?} in\n{text}"))
}

/// The fleet without its timestamp, which moves on with every call.
fn fleet_figures(addr: &str, operator: &str) -> Value {
    let mut f = json(addr, operator, &["--json", "fleet"]);
    f["time_unix_ms"] = Value::Null;
    f
}

#[tokio::test]
async fn top_shows_the_figures_the_api_gives() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = start(dir.path());
    let creds = wait_for_credentials(dir.path()).await;
    let op = creds.operator.clone();
    let tenant = |name: &str| creds.tenant(name).unwrap().to_string();

    // Load: work running for two tenants, and tenant-d, allowed no borrowing, holding most of
    // its 500P quota so that its second request waits for quota.
    for (who, args) in [
        ("tenant-a", &["--gang", "2x8"][..]),
        ("tenant-b", &["--elastic", "300P"]),
        ("tenant-d", &["--elastic", "400P"]),
    ] {
        let r = json(
            &addr,
            &tenant(who),
            &[&["--json", "submit", "--duration", "1h"], args].concat(),
        );
        assert_eq!(r["state"], "REQUEST_STATE_RUNNING", "{who}: {r}");
    }
    json(
        &addr,
        &op,
        &[
            "--json",
            "tenants",
            "set",
            "tenant-d",
            "--borrow-limit-p",
            "0",
        ],
    );
    let waiting = json(
        &addr,
        &tenant("tenant-d"),
        &["--json", "submit", "--elastic", "200P", "--duration", "1h"],
    );
    assert_eq!(waiting["state"], "REQUEST_STATE_QUEUED", "{waiting}");

    // The figures hold still once a scheduling pass has given the request its reason (every
    // lease lasts an hour); take a frame between two equal readings of the API.
    let mut settled = None;
    for _ in 0..500 {
        let fleet = fleet_figures(&addr, &op);
        let queue = json(&addr, &op, &["--json", "queue"]);
        let out = suanli_env(&addr, &op, &[("COLUMNS", "200")], &["top", "--once"]);
        let reason = &queue["requests"][0]["wait"]["reason"];
        if reason != "WAIT_REASON_PENDING"
            && fleet == fleet_figures(&addr, &op)
            && queue == json(&addr, &op, &["--json", "queue"])
        {
            settled = Some((fleet, queue, out));
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let (fleet, queue, out) = settled.expect("the broker's figures never held still");
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains('\x1b'), "plain text has no escape codes");

    // The summary: total, local and external, capacity, allocated and free.
    for part in ["total", "local", "external"] {
        let u = &fleet[part];
        let cells = row(&text, part);
        assert_eq!(cells[1], p(&u["capacity_tflops"]), "{part}");
        assert_eq!(cells[2], p(&u["allocated_tflops"]), "{part}");
        let free = u["capacity_tflops"].as_u64().unwrap() - u["allocated_tflops"].as_u64().unwrap();
        assert_eq!(cells[3], p(&free.into()), "{part}");
    }
    assert!(
        fleet["total"]["allocated_tflops"].as_u64().unwrap() >= 700_000,
        "the load holds at least 700P: {fleet}"
    );

    // Every pool, once, with its capacity and use (no terminal: no height limit).
    let pools = json(&addr, &op, &["--json", "pools", "--all-pages"]);
    let pools = pools["pools"].as_array().unwrap();
    assert!(text.contains(&format!("pools {}:", pools.len())), "{text}");
    for pool in pools {
        let id = pool["id"].as_str().unwrap();
        let rows = text
            .lines()
            .filter(|l| l.starts_with(&format!("{id} ")))
            .count();
        assert_eq!(rows, 1, "pool {id}");
        let cells = row(&text, id);
        assert_eq!(cells[1], "healthy", "{id}");
        assert_eq!(cells[2], p(&pool["utilisation"]["capacity_tflops"]), "{id}");
        assert_eq!(
            cells[3],
            p(&pool["utilisation"]["allocated_tflops"]),
            "{id}"
        );
    }

    // The queue: its length, and the waiting request with its reason and position.
    let length = fleet["queue"]["length"].as_u64().unwrap();
    assert_eq!(length, 1, "{fleet}");
    assert!(text.contains(&format!("QUEUE {length} waiting")), "{text}");
    let head = &queue["requests"][0];
    assert_eq!(head["id"], waiting["id"]);
    let reason = head["wait"]["reason"]
        .as_str()
        .unwrap()
        .trim_start_matches("WAIT_REASON_")
        .to_ascii_lowercase();
    assert_eq!(reason, "quota", "{head}");
    let position = head["wait"]["position"].to_string();
    let cells = row(&text, &position);
    assert_eq!(&cells[1..4], ["tenant-d", "elastic", "200P"], "{cells:?}");
    assert!(cells.contains(&reason.as_str()), "{cells:?}");
    assert_eq!(cells.last(), Some(&head["id"].to_string().as_str()));
    assert!(text.contains(&format!("by reason: {reason} 1")), "{text}");

    // Tenants: quota and use.
    let tenants = json(&addr, &op, &["--json", "tenants"]);
    for t in tenants["tenants"].as_array().unwrap() {
        let cells = row(&text, t["id"].as_str().unwrap());
        assert_eq!(cells[1], p(&t["quota_tflops"]), "{t}");
        assert_eq!(cells[2], p(&t["usage"]["used_tflops"]), "{t}");
    }

    // A terminal's worth: cut to 80 columns and 24 lines, the rest of the pools counted.
    let out = suanli_env(
        &addr,
        &op,
        &[("COLUMNS", "80"), ("LINES", "24")],
        &["top", "--once"],
    );
    assert!(out.status.success());
    let small = String::from_utf8(out.stdout).unwrap();
    assert!(small.lines().count() <= 24, "{small}");
    assert!(small.lines().all(|l| l.chars().count() <= 80), "{small}");
    assert!(small.contains(" more pools"), "{small}");

    // A refusal is an error on the screen and in the exit code, not unreachability.
    let out = suanli(&addr, "not-a-token", &["top", "--once"]);
    assert_eq!(out.status.code(), Some(1));
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("BROKER ERROR: UNAUTHENTICATED"), "{shown}");

    child.kill();
}

#[test]
fn top_once_tells_when_the_broker_is_unreachable() {
    // A port that was free a moment ago: nothing listens there.
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let out = suanli(&addr, "any", &["top", "--once"]);
    let shown = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    // --once exits with 1 when it has no figures to show, after showing why.
    assert_eq!(out.status.code(), Some(1), "{shown}{err}");
    assert!(shown.contains("BROKER UNREACHABLE"), "{shown}");
    assert!(shown.contains(&addr), "{shown}");
    assert!(shown.contains("No figures yet"), "{shown}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: cannot connect to the broker"),
        "{err}"
    );
}
