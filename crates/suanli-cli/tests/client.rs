//! The client commands of the real `suanli` binary against a real `suanli serve`: what a person
//! types, what a script reads (`--json`), and the one-line error with a non-zero exit.

mod support;

use std::process::{Command, Output};

use serde_json::Value;
use support::{start, wait_for_credentials};

/// Runs `suanli --addr http://ADDR --token TOKEN ARGS...`.
fn suanli(addr: &str, token: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_suanli"))
        .args(["--addr", &format!("http://{addr}"), "--token", token])
        .args(args)
        .output()
        .expect("run suanli")
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

#[tokio::test]
async fn a_tenant_and_an_operator_work_the_broker_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = start(dir.path());
    let creds = wait_for_credentials(dir.path()).await;
    let tenant = creds.tenant("tenant-a").unwrap().to_string();

    let me = json(&addr, &tenant, &["--json", "me"]);
    assert_eq!(me["id"], "tenant-a");
    assert!(me["quota_tflops"].as_u64().unwrap() > 0);

    let r = json(
        &addr,
        &tenant,
        &[
            "--json",
            "submit",
            "--gang",
            "1x8",
            "--model",
            "h100",
            "--duration",
            "1h",
        ],
    );
    assert_eq!(r["state"], "REQUEST_STATE_RUNNING", "{r}");
    let id = r["id"].as_u64().unwrap().to_string();
    let got = json(&addr, &tenant, &["--json", "get", &id]);
    assert_eq!(got["name"], r["name"]);
    let list = json(&addr, &tenant, &["--json", "list"]);
    let names: Vec<&Value> = list["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| &r["name"])
        .collect();
    assert_eq!(names, [&r["name"]]);

    let fleet = json(&addr, &creds.operator, &["--json", "fleet"]);
    assert!(fleet["total"]["allocated_devices"].as_u64().unwrap() >= 8);

    // A table for people.
    let out = suanli(&addr, &tenant, &["me"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("tenant-a"));

    // One line naming what went wrong, and a non-zero exit.
    let out = suanli(&addr, "not-a-token", &["list"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains("UNAUTHENTICATED"), "{err}");

    // `suanli replica`: a broker on its own leads; a checkpoint is recorded with its digest.
    let r = json(
        &addr,
        &creds.operator,
        &["--json", "replica", "--checkpoint"],
    );
    assert_eq!(r["replicated"], false);
    assert_eq!(r["leader"], true);
    let at = r["appended_checkpoint"]
        .as_u64()
        .expect("a checkpoint's index");
    let marks = r["checkpoints"].as_array().unwrap();
    assert!(
        marks
            .iter()
            .any(|c| c["log_index"] == at && c["digest"].as_str().unwrap().len() == 16),
        "{r}"
    );
    assert!(r["log_index"].as_u64().unwrap() > at, "{r}");
    let out = suanli(&addr, &creds.operator, &["replica"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("role         a broker on its own"),
        "{text}"
    );
    assert!(
        text.contains(&format!("checkpoint   {at:>12}  digest ")),
        "{text}"
    );
    assert_eq!(
        text.lines().count(),
        4,
        "role, log index, staleness, one checkpoint: {text}"
    );

    child.kill();
}

#[tokio::test]
async fn an_operator_creates_lists_and_revokes_tokens_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = start(dir.path());
    let creds = wait_for_credentials(dir.path()).await;
    let op = creds.operator.clone();

    let made = json(
        &addr,
        &op,
        &[
            "--json",
            "tokens",
            "create",
            "ml-team",
            "--tenant",
            "tenant-a",
            "--expires",
            "+30d",
        ],
    );
    let secret = made["secret"].as_str().unwrap().to_string();
    assert_eq!(made["token"]["name"], "ml-team");
    assert_eq!(made["token"]["owner"]["tenant"], "tenant-a");
    assert_eq!(made["token"]["state"], "active");
    assert!(made["token"]["expires_unix_ms"].as_u64().unwrap() > 0);
    assert_eq!(json(&addr, &secret, &["--json", "me"])["id"], "tenant-a");

    // As text: the secret once, with a word on keeping it.
    let pools = json(&addr, &op, &["--json", "pools"]);
    let pool = pools["pools"][0]["id"].as_str().unwrap().to_string();
    let out = suanli(
        &addr,
        &op,
        &["tokens", "create", "near-agent", "--pool", &pool],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("pool {pool}")), "{text}");
    assert!(text.contains("secret  agent-"), "{text}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("shown only now"));
    // An owner is required, and only one.
    let out = suanli(&addr, &op, &["tokens", "create", "x"]);
    assert!(!out.status.success());
    let out = suanli(
        &addr,
        &op,
        &["tokens", "create", "x", "--operator", "--pool", &pool],
    );
    assert!(!out.status.success());

    let list = json(&addr, &op, &["--json", "tokens"]);
    let names: Vec<&str> = list["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"ml-team") && names.contains(&"near-agent"),
        "{names:?}"
    );
    assert!(!list.to_string().contains(&secret));
    let out = suanli(&addr, &op, &["tokens"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("LAST USED") && table.contains("ml-team"),
        "{table}"
    );

    let revoked = json(&addr, &op, &["--json", "tokens", "revoke", "ml-team"]);
    assert_eq!(revoked["state"], "revoked");
    let out = suanli(&addr, &secret, &["me"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ml-team was revoked"), "{err}");
    let active = json(&addr, &op, &["--json", "tokens"]);
    assert!(!active.to_string().contains("ml-team"));
    let all = json(&addr, &op, &["--json", "tokens", "--all"]);
    assert!(all.to_string().contains("ml-team"));

    // The audit trail names who did each, and the refused credential.
    let trail = json(&addr, &op, &["--json", "audit", "--since", "-1h"]);
    let records = trail["records"].as_array().unwrap();
    let calls: Vec<(&str, &str, &str)> = records
        .iter()
        .map(|r| {
            (
                r["who"].as_str().unwrap(),
                r["rpc"].as_str().unwrap(),
                r["target"].as_str().unwrap(),
            )
        })
        .collect();
    assert!(
        calls.contains(&("operator:primary", "CreateToken", "tokens/ml-team"))
            && calls.contains(&("operator:primary", "RevokeToken", "tokens/ml-team")),
        "{calls:?}"
    );
    let out = suanli(&addr, &op, &["audit"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("OUTCOME") && table.contains("RevokeToken"),
        "{table}"
    );
    let failures = json(&addr, &op, &["--json", "audit", "--auth-failures"]);
    assert!(
        failures.to_string().contains("token ml-team was revoked"),
        "{failures}"
    );
    let out = suanli(&addr, &op, &["audit", "--since", "yesterday"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--since"));
    child.kill();
}
