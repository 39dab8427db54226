//! `suanli`: the front door to every part of the platform.
//!
//! - `suanli serve` runs the broker.
//! - Tenants (AI companies): `submit`, `get`, `list`, `cancel`, `release`, `watch`, `quote`, `me`.
//! - Operators: `fleet`, `pools`, `tenants`, `queue`, `tokens`, `audit`, and `top`, the live
//!   picture in a terminal.
//! - Accounting: `vouchers` (and `vouchers issue`), `bill`, `subsidy`, `budget`.
//! - `suanli agent` runs a pool's agent (with simulated jobs); `suanli loadgen` drives a broker
//!   and measures it.
//! - `suanli sim` runs the engine on a virtual clock over a trace; `suanli sim compare` writes
//!   the capacity-planning report.
//!
//! # Layout
//! - `client`: the broker's address, tokens and the credentials file, error lines.
//! - `parse` and `time`: the values people type (durations, shapes, amounts, times, names).
//! - `output`: tables and JSON.
//! - `tenant_cmds`, `operator_cmds`, `billing_cmds`, `top`, `agent`, `loadgen`, `serve`: one
//!   module per area.
//!
//! Errors are one line on stderr, `error: <gRPC code>: <message>` for a failed call; the exit
//! code is 2 for a usage error and 1 for any other failure.

#![forbid(unsafe_code)]

/// The broker allocates for every request, view and log entry; mimalloc serves that better than
/// the system allocator (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod agent;
mod billing_cmds;
mod client;
mod jobload;
mod loadgen;
mod operator_cmds;
mod output;
mod parse;
mod serve;
mod sim;
mod tenant_cmds;
mod time;
mod token_cmds;
mod top;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::client::GlobalArgs;

#[derive(Parser, Debug)]
#[command(
    name = "suanli",
    version,
    about = "suanli (算力): the compute brokerage of Futian District: broker, agent, load generator and client",
    after_help = "Without --token, client commands read the credentials that `suanli serve` writes to \
                  suanli-data/credentials.toml."
)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the broker until SIGINT or SIGTERM.
    Serve(serve::ServeArgs),

    /// Submit a request for compute.
    Submit(tenant_cmds::SubmitArgs),
    /// Show one request.
    Get(tenant_cmds::GetArgs),
    /// List the tenant's requests.
    List(tenant_cmds::ListArgs),
    /// Cancel a queued, placed or running request.
    Cancel(tenant_cmds::ChangeArgs),
    /// Give back a placed or running request's capacity before its time.
    Release(tenant_cmds::ChangeArgs),
    /// Print each change to one request, or to all of the tenant's requests, until interrupted.
    Watch(tenant_cmds::WatchArgs),
    /// Tell where and at what price a request would be placed now, without submitting it.
    Quote(tenant_cmds::SpecArgs),
    /// Show the calling tenant: quota, borrowing limit, weight and usage.
    Me,
    /// Print the output of a request's job on one node (stdout to stdout, stderr to stderr).
    Logs(tenant_cmds::LogsArgs),

    /// Show the fleet: capacity, use, pools, queue (operator).
    Fleet,
    /// List pools; show, drain or undrain one (operator).
    Pools(operator_cmds::PoolsArgs),
    /// List tenants; create or change one (operator).
    Tenants(operator_cmds::TenantsArgs),
    /// List queued requests of all tenants in queue order (operator).
    Queue(operator_cmds::QueueArgs),
    /// Show a broker's place in its group: role, term, leader, log index, staleness, recent
    /// checkpoints; asks the first address of --addr (operator).
    Replica(operator_cmds::ReplicaArgs),
    /// Watch the fleet, the pools, the queue and the tenants live in the terminal; without a
    /// terminal or with --once, print one screen as plain text (operator).
    Top(top::TopArgs),
    /// List bearer tokens; create one (its secret shown once) or revoke one (operator).
    Tokens(token_cmds::TokensArgs),
    /// Show the audit trail: who changed what, when, and whether it took effect; or, with
    /// --auth-failures, the refused credentials (operator).
    Audit(operator_cmds::AuditArgs),

    /// List compute vouchers with their balances (a tenant: its own; the operator: all, or
    /// --tenant's); `vouchers issue` issues one (operator).
    Vouchers(billing_cmds::VouchersArgs),
    /// Show a month's statement: usage, cost, subsidy, amount due (a tenant: its own; the
    /// operator: --tenant's).
    Bill(billing_cmds::BillArgs),
    /// Show the subsidy vouchers paid per month and pool kind (operator).
    Subsidy(billing_cmds::SubsidyArgs),
    /// Set or remove the spending limit of the tenant named by --tenant (operator).
    Budget(billing_cmds::BudgetArgs),
    /// Charge (or with a negative amount credit) the tenant named by --tenant, with a reason
    /// shown on its statement (operator).
    Adjust(billing_cmds::AdjustArgs),

    /// Run a pool's agent: register the pool and run its leases' jobs (--backend sim,
    /// process or slurm).
    Agent(agent::AgentArgs),
    /// Run one node's copy of a job and record how it ended (started by the agent's process
    /// backend, not by people).
    #[command(hide = true)]
    ExecNode(agent::ExecNodeArgs),
    /// Drive a broker with many tenants' submissions and measure its latency.
    Loadgen(loadgen::LoadgenArgs),
    /// Simulate a workload on a fleet with the engine on a virtual clock; `sim compare` writes
    /// the capacity-planning report.
    Sim(sim::SimArgs),
}

impl Command {
    /// Long-running commands log at `info`; one-shot client commands only warn.
    fn default_log_level(&self) -> &'static str {
        match self {
            Command::Serve(_) | Command::Agent(_) | Command::Loadgen(_) => "info",
            _ => "warn",
        }
    }
}

async fn dispatch(g: &GlobalArgs, command: &Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(a) => serve::run(a, g.data_dir.clone()).await,
        Command::Submit(a) => tenant_cmds::submit(g, a).await,
        Command::Get(a) => tenant_cmds::get(g, a).await,
        Command::List(a) => tenant_cmds::list(g, a).await,
        Command::Cancel(a) => tenant_cmds::cancel(g, a).await,
        Command::Release(a) => tenant_cmds::release(g, a).await,
        Command::Watch(a) => tenant_cmds::watch(g, a).await,
        Command::Quote(a) => tenant_cmds::quote(g, a).await,
        Command::Me => tenant_cmds::me(g).await,
        Command::Logs(a) => tenant_cmds::logs(g, a).await,
        Command::Fleet => operator_cmds::fleet(g).await,
        Command::Replica(a) => operator_cmds::replica(g, a).await,
        Command::Tokens(a) => token_cmds::tokens(g, a).await,
        Command::Audit(a) => operator_cmds::audit(g, a).await,
        Command::Pools(a) => operator_cmds::pools(g, a).await,
        Command::Tenants(a) => operator_cmds::tenants(g, a).await,
        Command::Queue(a) => operator_cmds::queue(g, a).await,
        Command::Top(a) => top::run(g, a).await,
        Command::Vouchers(a) => billing_cmds::vouchers(g, a).await,
        Command::Bill(a) => billing_cmds::bill(g, a).await,
        Command::Subsidy(a) => billing_cmds::subsidy(g, a).await,
        Command::Budget(a) => billing_cmds::budget(g, a).await,
        Command::Adjust(a) => billing_cmds::adjust(g, a).await,
        Command::Agent(a) => agent::run(g, a).await,
        Command::ExecNode(a) => agent::exec_node(a),
        Command::Loadgen(a) => loadgen::run(g, a).await,
        Command::Sim(a) => sim::run(g, a),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::ExecNode(a) = &cli.command {
        // No runtime, no logging: the wrapper only waits for its job.
        return match agent::exec_node(a) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {}", client::error_line(&e));
                ExitCode::FAILURE
            }
        };
    }
    serve::init_logging(cli.global.log_json, cli.command.default_log_level());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(&cli.global, &cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", client::error_line(&e));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;
    use clap::error::ErrorKind;

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("suanli").chain(args.iter().copied()))
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn bad_values_name_their_flag() {
        for (args, flag) in [
            (
                &["submit", "--gang", "2x", "--duration", "1h"][..],
                "--gang",
            ),
            (&["submit", "--gang", "0x8", "--duration", "1h"], "--gang"),
            (
                &["quote", "--elastic", "5Q", "--duration", "1h"],
                "--elastic",
            ),
            (
                &["submit", "--gang", "1x8", "--duration", "90"],
                "--duration",
            ),
            (
                &[
                    "submit",
                    "--gang",
                    "1x8",
                    "--duration",
                    "1h",
                    "--deadline",
                    "soon",
                ],
                "--deadline",
            ),
            (
                &["tenants", "set", "acme", "--quota-p", "lots"],
                "--quota-p",
            ),
            (
                &["agent", "--fleet", "f", "--pool", "p", "--speedup", "0"],
                "--speedup",
            ),
            (
                &[
                    "vouchers", "issue", "--face", "ten", "--rate", "50%", "--until", "+30d",
                ],
                "--face",
            ),
            (
                &[
                    "vouchers", "issue", "--face", "10", "--rate", "150%", "--until", "+30d",
                ],
                "--rate",
            ),
            (
                &[
                    "vouchers", "issue", "--face", "10", "--rate", "50%", "--until", "soon",
                ],
                "--until",
            ),
            (
                &[
                    "vouchers", "issue", "--face", "10", "--rate", "5%", "--until", "+1d",
                    "--scope", "moon",
                ],
                "--scope",
            ),
            (&["bill", "--month", "2025-13"], "--month"),
            (&["budget", "--limit", "1.234"], "--limit"),
        ] {
            let err = parse(args).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::ValueValidation, "{args:?}");
            assert!(err.to_string().contains(flag), "{args:?}: {err}");
            assert_eq!(err.exit_code(), 2);
        }
    }

    #[test]
    fn a_request_has_exactly_one_shape() {
        let err = parse(&["submit", "--duration", "1h"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::MissingRequiredArgument);
        let err = parse(&[
            "submit",
            "--gang",
            "1x8",
            "--elastic",
            "5P",
            "--duration",
            "1h",
        ])
        .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ArgumentConflict);
        let err = parse(&[
            "submit",
            "--gang",
            "1x8",
            "--min-chunk",
            "1P",
            "--duration",
            "1h",
        ])
        .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ArgumentConflict);
    }

    #[test]
    fn submit_builds_the_spec() {
        let cli = parse(&[
            "submit",
            "--elastic",
            "5P",
            "--min-chunk",
            "500",
            "--duration",
            "2h",
            "--priority",
            "spot",
            "--model",
            "h100,h800",
            "--model",
            "a800",
            "--region",
            "guizhou-guiyang",
            "--max-rtt-ms",
            "30",
            "--data-zone",
            "mainland",
            "--max-price",
            "1500",
            "--policy",
            "lowest_latency",
            "--start-after",
            "+1h",
            "--deadline",
            "1970-01-02T00:00:00Z",
            "--requeue",
            "--request-id",
            "abc",
            "--wait-for-pools",
        ])
        .unwrap();
        let Command::Submit(a) = cli.command else {
            panic!("not submit")
        };
        assert_eq!(a.request_id.as_deref(), Some("abc"));
        assert!(a.wait_for_pools);
        let spec = a.spec.to_spec(1000);
        use suanli_proto::v1::{ElasticShape, Policy, Priority, request_spec::Shape};
        assert_eq!(
            spec.shape,
            Some(Shape::Elastic(ElasticShape {
                tflops: 5000,
                min_chunk_tflops: 500
            }))
        );
        assert_eq!(spec.duration_ms, 7_200_000);
        assert_eq!(spec.priority, Priority::Spot as i32);
        assert_eq!(spec.policy, Policy::LowestLatency as i32);
        let c = spec.constraints.unwrap();
        assert_eq!(c.models, ["h100", "h800", "a800"]);
        assert_eq!(c.regions, ["guizhou-guiyang"]);
        assert_eq!(c.max_rtt_ms, Some(30));
        assert_eq!(c.data_zone.as_deref(), Some("mainland"));
        assert_eq!(c.max_price_fen_per_device_hour, Some(1500));
        assert_eq!(spec.start_after_unix_ms, Some(1000 + 3_600_000));
        assert_eq!(spec.deadline_unix_ms, Some(86_400_000));
        assert!(spec.requeue);
    }

    #[test]
    fn global_flags_go_anywhere_and_subcommands_nest() {
        let cli = parse(&["pools", "drain", "futian-aicc", "--json", "--addr", "h:1"]).unwrap();
        assert!(cli.global.json);
        assert_eq!(cli.global.addr, "h:1");
        assert!(matches!(
            cli.command,
            Command::Pools(operator_cmds::PoolsArgs {
                action: Some(operator_cmds::PoolsAction::Drain { .. }),
                ..
            })
        ));
        let cli = parse(&["--json", "list", "--state", "queued,running", "--all-pages"]).unwrap();
        let Command::List(a) = cli.command else {
            panic!("not list")
        };
        assert_eq!(a.states.len(), 2);
        assert!(a.page.all_pages);
        assert!(parse(&["loadgen", "--rate", "10", "--concurrency", "4"]).is_err());
        assert!(
            parse(&[
                "tenants",
                "set",
                "a",
                "--borrow-limit-p",
                "1",
                "--no-borrow-limit"
            ])
            .is_err()
        );
    }
}
