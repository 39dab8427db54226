//! Fleet files for suanli, generated deterministically from a seed.
//!
//! A fleet file lists the compute pools the broker can schedule on: each pool's kind, region,
//! round-trip time from the district, data zone and node groups (accelerator model, node shape,
//! node count, price). This crate writes two kinds of fleet:
//!
//! - [`futian`]: the Futian District fleet at the end of 2024 (about 4100P of local supply and
//!   145 external pools, about 10500P in all) and its 2025 growth (about 21000P). The local
//!   pools are hand-written data; external pools are drawn from market tables of regions,
//!   models, sizes and prices. The 2025 fleet keeps every 2024 pool as it was and only adds,
//!   so comparing the two files shows exactly what grew.
//! - [`synthetic`]: a fleet with any number of pools drawn from the same distributions, for
//!   scaling benchmarks of the core.
//!
//! Capacity uses the accelerator figures of `deploy/catalogue.toml`, compiled in, so they are
//! written down once. The same seed always gives the same text.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod catalogue;
mod external;
mod fleet;
mod local;
mod market;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::catalogue::Catalogue;
use crate::external::{ExternalMarket, region_of, scale_to_target};
use crate::fleet::{Fleet, Group, Pool, PoolKind};
use crate::market::Mix;

pub use crate::fleet::FleetTotals;

/// External pools connected to the platform at the end of 2024.
const EXTERNAL_POOLS_2024: usize = 145;
/// Their capacity: with the local ~4100P this makes about 10500P schedulable.
const EXTERNAL_TFLOPS_2024: u64 = 6_330_000;
/// External pools that add a model in 2025.
const GROWN_POOLS_2025: usize = 24;
/// External pools that join in 2025.
const NEW_POOLS_2025: usize = 90;
/// Capacity of the 2025 external additions (new groups and new pools): with the local
/// centre's new hall this takes the fleet to about 21000P.
const EXTERNAL_GROWTH_TFLOPS_2025: u64 = 8_900_000;
/// The 2025 additions come from their own ChaCha stream of the same seed, so drawing them
/// cannot disturb the 2024 draws.
const GROWTH_STREAM_2025: u64 = 2025;

/// Which year-end state of the Futian fleet to generate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FleetYear {
    /// End of 2024: more than 10000P schedulable.
    Y2024,
    /// The 2025 target: more than 20000P schedulable.
    Y2025,
}

impl FleetYear {
    /// The year for a calendar number, if the generator knows it.
    pub fn from_number(year: u16) -> Option<Self> {
        match year {
            2024 => Some(FleetYear::Y2024),
            2025 => Some(FleetYear::Y2025),
            _ => None,
        }
    }

    /// The calendar number of the year.
    pub fn number(self) -> u16 {
        match self {
            FleetYear::Y2024 => 2024,
            FleetYear::Y2025 => 2025,
        }
    }
}

/// The Futian fleet file for `year`, drawn from `seed`.
pub fn futian(year: FleetYear, seed: u64) -> String {
    futian_with_totals(year, seed).0
}

/// The Futian fleet file for `year` and its totals.
pub fn futian_with_totals(year: FleetYear, seed: u64) -> (String, FleetTotals) {
    let catalogue = Catalogue::embedded();
    render(&futian_fleet(year, seed, &catalogue), &catalogue)
}

/// A fleet file with exactly `pools` pools: the three local pools of 2024 first, the rest
/// external, drawn from `seed`.
pub fn synthetic(pools: usize, seed: u64) -> String {
    synthetic_with_totals(pools, seed).0
}

/// A synthetic fleet file and its totals.
pub fn synthetic_with_totals(pools: usize, seed: u64) -> (String, FleetTotals) {
    render(&synthetic_fleet(pools, seed), &Catalogue::embedded())
}

fn render(fleet: &Fleet, catalogue: &Catalogue) -> (String, FleetTotals) {
    let totals = fleet.totals(catalogue);
    (fleet.render(&totals), totals)
}

fn futian_fleet(year: FleetYear, seed: u64, catalogue: &Catalogue) -> Fleet {
    let mut pools = futian_2024(seed, catalogue);
    if year == FleetYear::Y2025 {
        grow_to_2025(&mut pools, seed, catalogue);
    }
    Fleet {
        name: format!("futian-{}", year.number()),
        description: futian_description(year, seed),
        pools,
    }
}

/// The local pools, then the external pools scaled to the 2024 capacity.
fn futian_2024(seed: u64, catalogue: &Catalogue) -> Vec<Pool> {
    let mut market = ExternalMarket::new(ChaCha8Rng::seed_from_u64(seed), Mix::Y2024, 1);
    let mut external: Vec<Pool> = (0..EXTERNAL_POOLS_2024).map(|_| market.pool()).collect();
    scale_to_target(
        &mut groups_of(&mut external),
        EXTERNAL_TFLOPS_2024,
        catalogue,
    );
    let mut pools = local::pools_2024();
    pools.extend(external);
    pools
}

/// Adds 2025's growth after the 2024 content: the local centre's new hall, a new model in
/// some external pools, and new external pools.
fn grow_to_2025(pools: &mut Vec<Pool>, seed: u64, catalogue: &Catalogue) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(GROWTH_STREAM_2025);
    let external_2024: Vec<usize> = (0..pools.len())
        .filter(|&index| pools[index].kind == PoolKind::External)
        .collect();
    let mut market = ExternalMarket::new(rng, Mix::Y2025, external_2024.len() + 1);

    // Draw and scale all external additions first; attach them once their sizes are final.
    let mut new_groups: Vec<(usize, Group)> = market
        .pick_indices(external_2024.len(), GROWN_POOLS_2025)
        .into_iter()
        .map(|pick| {
            let index = external_2024[pick];
            let pool = &pools[index];
            let models: Vec<&str> = pool.groups.iter().map(|group| group.model).collect();
            (index, market.group(region_of(pool), &models))
        })
        .collect();
    let mut new_pools: Vec<Pool> = (0..NEW_POOLS_2025).map(|_| market.pool()).collect();
    let mut additions: Vec<&mut Group> = new_groups.iter_mut().map(|(_, group)| group).collect();
    additions.extend(groups_of(&mut new_pools));
    scale_to_target(&mut additions, EXTERNAL_GROWTH_TFLOPS_2025, catalogue);

    let centre = pools
        .iter_mut()
        .find(|pool| pool.kind == PoolKind::LocalCentre)
        .expect("the 2024 fleet has a local centre");
    centre.groups.push(local::centre_growth_2025());
    for (index, group) in new_groups {
        pools[index].groups.push(group);
    }
    pools.extend(new_pools);
}

fn synthetic_fleet(pool_count: usize, seed: u64) -> Fleet {
    let mut pools: Vec<Pool> = local::pools_2024().into_iter().take(pool_count).collect();
    let mut market = ExternalMarket::new(ChaCha8Rng::seed_from_u64(seed), Mix::Y2024, 1);
    let external = pool_count - pools.len();
    pools.extend((0..external).map(|_| market.pool()));
    Fleet {
        name: format!("synthetic-{pool_count}"),
        description: vec![
            format!("Synthetic suanli fleet of {pool_count} pools for scaling benchmarks: the"),
            "three Futian local pools of 2024, then external pools drawn from the generator's"
                .into(),
            "market tables (region, model, heavy-tailed size, price). Not a real fleet.".into(),
            "Generated by suanli-fleetgen; regenerate with:".into(),
            format!(
                "  cargo run -p suanli-fleetgen -- synthetic --pools {pool_count} --seed {seed}"
            ),
        ],
        pools,
    }
}

fn groups_of(pools: &mut [Pool]) -> Vec<&mut Group> {
    pools.iter_mut().flat_map(|pool| &mut pool.groups).collect()
}

fn futian_description(year: FleetYear, seed: u64) -> Vec<String> {
    let number = year.number();
    let mut lines = vec![
        format!("Futian District (Shenzhen) compute fleet, end of {number}: the district's own"),
        "supply (one local compute centre, two local cloud platforms) and the external pools"
            .into(),
        "connected to the platform across China.".into(),
        "Generated by suanli-fleetgen; do not edit by hand. Regenerate with:".into(),
        format!(
            "  cargo run -p suanli-fleetgen -- futian --year {number} --seed {seed} > deploy/fleets/futian-{number}.toml"
        ),
        "The local pools are hand-written data in the generator. The external pools are drawn"
            .into(),
        "from its market tables (region and round trip, model mix, heavy-tailed sizes, regional"
            .into(),
        "prices): a realistic model of the fleet, not a register of real operators.".into(),
    ];
    if year == FleetYear::Y2025 {
        lines.extend([
            format!(
                "2025 extends the 2024 fleet of the same seed ({seed}) and only adds: every 2024"
            ),
            "pool is unchanged except that some gain node groups after their 2024 ones; new pools"
                .into(),
            "follow. The additions come from a separate random stream derived from the seed."
                .into(),
        ]);
    }
    lines
}

#[cfg(test)]
mod tests;
