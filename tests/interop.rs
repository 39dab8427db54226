//! Interoperability: a client built on another gRPC implementation (Python's grpcio, on gRPC's
//! C core) drives the broker through stubs generated from `proto/` at test time, and checks the
//! tenant and operator services, auth, the health service and reflection.
//!
//! Needs `python3` with `grpcio-tools` (health and reflection checks also need
//! `grpcio-health-checking` and `grpcio-reflection`). Without them the test prints a notice and
//! passes as skipped, unless `SUANLI_REQUIRE_INTEROP=1` is set, as CI does: then it fails.
//! `SUANLI_PYTHON` names another interpreter.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use suanli_e2e::{Broker, test_config};

/// The proto files the client needs, relative to `proto/`.
const PROTOS: [&str; 4] = [
    "suanli/v1/types.proto",
    "suanli/v1/tenant.proto",
    "suanli/v1/pool.proto",
    "suanli/v1/operator.proto",
];

/// How long the client may run before it is killed.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn required() -> bool {
    std::env::var("SUANLI_REQUIRE_INTEROP").is_ok_and(|v| v == "1")
}

/// Prints a notice past the test harness's output capture, so that a skip shows in a plain
/// `cargo test` run.
fn notice(text: &str) {
    let _ = writeln!(std::io::stderr(), "{text}");
}

/// Whether `python` can import `modules`; the error says why not.
fn imports(python: &str, modules: &str) -> Result<(), String> {
    let out = Command::new(python)
        .args(["-c", &format!("import {modules}")])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `{python}`: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr.lines().last().unwrap_or("").trim();
        Err(format!("`{python}` cannot import {modules}: {last}"))
    }
}

/// An optional Python package: true when importable; a failure when `SUANLI_REQUIRE_INTEROP=1`
/// and it is not; otherwise a notice and false.
fn optional(python: &str, module: &str, package: &str) -> bool {
    match imports(python, module) {
        Ok(()) => true,
        Err(why) if required() => panic!(
            "SUANLI_REQUIRE_INTEROP=1 but {why}; install it with \
             `{python} -m pip install {package}`"
        ),
        Err(why) => {
            notice(&format!(
                "skipped part: {why}; install {package} to check it"
            ));
            false
        }
    }
}

/// Generates the Python stubs of `proto/` into `out`.
fn generate_stubs(python: &str, out: &Path) {
    let proto = workspace_root().join("proto");
    let result = Command::new(python)
        .args(["-m", "grpc_tools.protoc"])
        .arg(format!("-I{}", proto.display()))
        .arg(format!("--python_out={}", out.display()))
        .arg(format!("--grpc_python_out={}", out.display()))
        .args(PROTOS)
        .stdin(Stdio::null())
        .output()
        .expect("run grpc_tools.protoc");
    assert!(
        result.status.success(),
        "grpc_tools.protoc failed ({}):\n{}{}",
        result.status,
        String::from_utf8_lossy(&result.stdout),
        String::from_utf8_lossy(&result.stderr)
    );
    for p in PROTOS {
        let stem = p.trim_end_matches(".proto");
        for suffix in ["_pb2.py", "_pb2_grpc.py"] {
            let file = out.join(format!("{stem}{suffix}"));
            assert!(file.is_file(), "protoc did not write {}", file.display());
        }
    }
}

#[tokio::test]
async fn a_grpcio_client_speaks_to_the_broker() {
    let python = std::env::var("SUANLI_PYTHON").unwrap_or_else(|_| "python3".into());
    if let Err(why) = imports(&python, "grpc, grpc_tools") {
        if required() {
            panic!(
                "SUANLI_REQUIRE_INTEROP=1 but {why}; install the client's packages with \
                 `{python} -m pip install grpcio-tools grpcio-health-checking grpcio-reflection`"
            );
        }
        notice(&format!(
            "skipped: the interop test needs Python with grpcio: {why}; install grpcio-tools \
             (and grpcio-health-checking, grpcio-reflection) with pip, or set SUANLI_PYTHON"
        ));
        return;
    }
    let health = optional(
        &python,
        "grpc_health.v1.health_pb2",
        "grpcio-health-checking",
    );
    let reflection = optional(
        &python,
        "grpc_reflection.v1alpha.reflection_pb2",
        "grpcio-reflection",
    );

    let stubs = tempfile::tempdir().expect("stub dir");
    generate_stubs(&python, stubs.path());

    let dir = tempfile::tempdir().expect("data dir");
    let broker = Broker::start(test_config(dir.path())).await;
    let tenant_a = broker.tenant_token("tenant-a");
    let tenant_b = broker.tenant_token("tenant-b");
    let operator = broker.creds.operator.clone();

    // The client's output goes to a file: no pipe to fill while the test polls the child.
    let log_path = stubs.path().join("client.log");
    let log = std::fs::File::create(&log_path).expect("client log");
    let mut cmd = Command::new(&python);
    cmd.arg(workspace_root().join("tests/interop/client.py"))
        .arg("--addr")
        .arg(broker.addr.to_string())
        .arg("--tenant-a")
        .arg(&tenant_a)
        .arg("--tenant-b")
        .arg(&tenant_b)
        .arg("--operator")
        .arg(&operator)
        .env("PYTHONPATH", stubs.path())
        .env("PYTHONUNBUFFERED", "1")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log handle"))
        .stderr(log);
    if !health {
        cmd.arg("--no-health");
    }
    if !reflection {
        cmd.arg("--no-reflection");
    }
    let mut child = cmd.spawn().expect("start the Python client");
    // Poll without blocking the runtime: the broker serves on this same thread.
    let deadline = Instant::now() + CLIENT_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the client") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let output = std::fs::read_to_string(&log_path).unwrap_or_default();
    match status {
        Some(s) if s.success() => println!("{output}"),
        Some(s) => panic!("the Python client failed ({s}):\n{output}"),
        None => panic!("the Python client did not finish in {CLIENT_TIMEOUT:?}:\n{output}"),
    }
    broker.stop().await;
}
