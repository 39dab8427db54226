use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

use super::*;
use crate::fleet::render_pool;
use crate::market::OFFERS;

const P: u64 = 1000;

/// The fleet schema as the platform reads it, strictly, so the tests catch any drift in the
/// rendered text.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FleetFile {
    name: String,
    pool: Vec<PoolEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolEntry {
    id: String,
    name: String,
    kind: String,
    region: String,
    rtt_ms: u32,
    data_zone: String,
    billing_increment_s: Option<u32>,
    group: Vec<GroupEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupEntry {
    model: String,
    devices_per_node: u32,
    nodes: u32,
    interconnect: String,
    price_fen_per_device_hour: u32,
}

fn parse(text: &str) -> FleetFile {
    toml::from_str(text).expect("generated fleet should parse as the fleet schema")
}

fn external_pools(fleet: &Fleet) -> usize {
    fleet
        .pools
        .iter()
        .filter(|pool| pool.kind == PoolKind::External)
        .count()
}

#[test]
fn the_same_seed_gives_the_same_text() {
    for year in [FleetYear::Y2024, FleetYear::Y2025] {
        assert_eq!(futian(year, 7), futian(year, 7));
        assert_ne!(futian(year, 7), futian(year, 8));
    }
    assert_eq!(synthetic(150, 3), synthetic(150, 3));
    assert_ne!(synthetic(150, 3), synthetic(150, 4));
}

#[test]
fn futian_2024_matches_the_published_figures_for_any_seed() {
    let catalogue = Catalogue::embedded();
    for seed in [2024, 0, 1, 42, u64::MAX] {
        let fleet = futian_fleet(FleetYear::Y2024, seed, &catalogue);
        let totals = fleet.totals(&catalogue);
        assert!(external_pools(&fleet) >= 140, "seed {seed}: {totals}");
        assert!(totals.local_tflops >= 4000 * P, "seed {seed}: {totals}");
        assert!(totals.total_tflops() >= 10_000 * P, "seed {seed}: {totals}");
    }
}

#[test]
fn futian_2025_reaches_its_target_for_any_seed() {
    let catalogue = Catalogue::embedded();
    for seed in [2024, 0, 1, 42, u64::MAX] {
        let totals = futian_fleet(FleetYear::Y2025, seed, &catalogue).totals(&catalogue);
        assert!(totals.total_tflops() >= 20_000 * P, "seed {seed}: {totals}");
    }
}

#[test]
fn futian_2025_keeps_every_2024_pool_and_only_adds_groups() {
    let catalogue = Catalogue::embedded();
    let fleet_2024 = futian_fleet(FleetYear::Y2024, 2024, &catalogue);
    let fleet_2025 = futian_fleet(FleetYear::Y2025, 2024, &catalogue);
    let text_2025 = futian(FleetYear::Y2025, 2024);
    for (old, new) in fleet_2024.pools.iter().zip(&fleet_2025.pools) {
        let mut without_additions = new.clone();
        without_additions.groups.truncate(old.groups.len());
        assert_eq!(old, &without_additions, "pool {} changed", old.id);
        let mut block = String::new();
        render_pool(old, &mut block);
        assert!(
            text_2025.contains(&block),
            "pool {} is not verbatim",
            old.id
        );
    }
    assert!(fleet_2025.pools.len() > fleet_2024.pools.len());
    let grown = fleet_2024
        .pools
        .iter()
        .zip(&fleet_2025.pools)
        .filter(|(old, new)| old.groups.len() < new.groups.len())
        .count();
    assert_eq!(
        grown,
        GROWN_POOLS_2025 + 1,
        "grown external pools plus the centre"
    );
}

#[test]
fn synthetic_fleets_have_exactly_the_requested_unique_pools() {
    for pools in [0, 2, 3, 150, 15_000] {
        let fleet = synthetic_fleet(pools, 11);
        assert_eq!(fleet.pools.len(), pools);
        let ids: BTreeSet<&str> = fleet.pools.iter().map(|pool| pool.id.as_str()).collect();
        assert_eq!(ids.len(), pools, "ids are unique");
        let locals = fleet
            .pools
            .iter()
            .filter(|pool| pool.kind != PoolKind::External);
        assert_eq!(
            locals.count(),
            pools.min(3),
            "the first three pools are local"
        );
    }
}

#[test]
fn every_model_used_is_in_the_catalogue() {
    let catalogue = Catalogue::embedded();
    for offer in OFFERS {
        assert!(catalogue.contains(offer.model), "{}", offer.model);
    }
    let fleets = [
        futian_fleet(FleetYear::Y2025, 2024, &catalogue),
        synthetic_fleet(1500, 5),
    ];
    for pool in fleets.iter().flat_map(|fleet| &fleet.pools) {
        for group in &pool.groups {
            assert!(catalogue.contains(group.model), "{}", group.model);
        }
    }
}

#[test]
fn generated_text_follows_the_fleet_schema_and_matches_its_totals() {
    let catalogue = Catalogue::embedded();
    let tflops: BTreeMap<&str, u64> = OFFERS
        .iter()
        .map(|offer| (offer.model, catalogue.tflops(offer.model)))
        .collect();
    let fleets = [
        futian_with_totals(FleetYear::Y2024, 2024),
        futian_with_totals(FleetYear::Y2025, 2024),
        synthetic_with_totals(1500, 5),
    ];
    for (text, totals) in fleets {
        let file = parse(&text);
        assert!(!file.name.is_empty());
        assert_eq!(file.pool.len(), totals.pools);
        let (mut local, mut external) = (0, 0);
        for pool in &file.pool {
            assert!(
                pool.id
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
                "{}",
                pool.id
            );
            assert!(!pool.name.is_empty() && pool.rtt_ms >= 1, "{}", pool.id);
            assert!(pool.region.contains('-'), "{}", pool.region);
            assert!(["mainland", "hetao"].contains(&pool.data_zone.as_str()));
            let per_started = if pool.kind == "external" { 3_600 } else { 60 };
            assert_eq!(pool.billing_increment_s, Some(per_started), "{}", pool.id);
            assert!(!pool.group.is_empty(), "{}", pool.id);
            for group in &pool.group {
                assert!((1..=16).contains(&group.devices_per_node));
                assert!(group.nodes >= 1 && group.price_fen_per_device_hour > 0);
                assert!(
                    ["nvlink", "pcie", "hccs", "infinity-fabric"]
                        .contains(&group.interconnect.as_str())
                );
                let capacity =
                    u64::from(group.nodes * group.devices_per_node) * tflops[group.model.as_str()];
                match pool.kind.as_str() {
                    "local_centre" | "local_cloud" => local += capacity,
                    "external" => external += capacity,
                    other => panic!("unknown pool kind {other}"),
                }
            }
        }
        assert_eq!(
            (local, external),
            (totals.local_tflops, totals.external_tflops)
        );
    }
}

#[test]
fn committed_fleet_files_are_what_the_generator_writes() {
    let committed = [
        (
            FleetYear::Y2024,
            include_str!("../../../deploy/fleets/futian-2024.toml"),
        ),
        (
            FleetYear::Y2025,
            include_str!("../../../deploy/fleets/futian-2025.toml"),
        ),
    ];
    for (year, text) in committed {
        let number = year.number();
        // Not assert_eq: a diff of two whole fleet files would bury the message.
        assert!(
            futian(year, 2024) == text,
            "deploy/fleets/futian-{number}.toml is stale; regenerate it with \
             `cargo run -p suanli-fleetgen -- futian --year {number} --seed 2024 > deploy/fleets/futian-{number}.toml`"
        );
    }
}
