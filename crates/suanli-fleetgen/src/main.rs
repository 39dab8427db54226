//! `suanli-fleetgen`: writes a fleet file to stdout and its totals to stderr.
//!
//! ```text
//! suanli-fleetgen futian --year 2024 --seed 2024 > deploy/fleets/futian-2024.toml
//! suanli-fleetgen futian --year 2025 --seed 2024 > deploy/fleets/futian-2025.toml
//! suanli-fleetgen synthetic --pools 15000 --seed 1
//! ```

#![forbid(unsafe_code)]

use std::io::Write as _;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use suanli_fleetgen::FleetYear;

#[derive(Parser)]
#[command(
    version,
    about = "Generate suanli fleet files deterministically from a seed"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The Futian District fleet at the end of 2024 or 2025.
    Futian {
        /// 2024 or 2025.
        #[arg(long, value_parser = parse_year)]
        year: FleetYear,
        /// Random seed; the committed fleets use 2024 for both years.
        #[arg(long)]
        seed: u64,
    },
    /// A fleet of any size for scaling benchmarks.
    Synthetic {
        /// Number of pools (the first three are local).
        #[arg(long)]
        pools: usize,
        /// Random seed.
        #[arg(long)]
        seed: u64,
    },
}

fn parse_year(text: &str) -> Result<FleetYear, String> {
    text.parse::<u16>()
        .ok()
        .and_then(FleetYear::from_number)
        .ok_or_else(|| format!("unknown year {text:?}: expected 2024 or 2025"))
}

fn main() -> anyhow::Result<()> {
    let (label, (toml, totals)) = match Cli::parse().command {
        Command::Futian { year, seed } => (
            format!("futian-{}", year.number()),
            suanli_fleetgen::futian_with_totals(year, seed),
        ),
        Command::Synthetic { pools, seed } => (
            format!("synthetic-{pools}"),
            suanli_fleetgen::synthetic_with_totals(pools, seed),
        ),
    };
    std::io::stdout()
        .lock()
        .write_all(toml.as_bytes())
        .context("writing the fleet to stdout")?;
    eprintln!("{label}: {totals}");
    Ok(())
}
