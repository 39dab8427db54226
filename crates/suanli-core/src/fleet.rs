//! Pools and node groups as data: the fleet file format, its validation, and the built-in
//! Futian fleets (`deploy/fleets/`).
//!
//! Validation names the pool and the field that is wrong, so an operator can fix a fleet file
//! (or a pool registration) without guessing.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::catalogue::Catalogue;
use crate::units::Tflops;

/// The Futian fleet at the end of 2024: about 4000P local, 140+ external pools, 10000P+ in all.
pub const FUTIAN_2024: &str = include_str!("../../../deploy/fleets/futian-2024.toml");
/// The Futian fleet grown to the 2025 target of 20000P+.
pub const FUTIAN_2025: &str = include_str!("../../../deploy/fleets/futian-2025.toml");

/// Largest number of devices on one node.
pub const MAX_DEVICES_PER_NODE: u16 = 16;

/// Longest billing increment a pool may have: one day.
pub const MAX_BILLING_INCREMENT_S: u32 = 86_400;

/// Where a pool sits relative to the district.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolKind {
    /// The district's own compute centre.
    LocalCentre,
    /// One of the district's cloud platforms.
    LocalCloud,
    /// A connected external pool elsewhere in China.
    External,
}

impl PoolKind {
    /// Local pools (the centre and the clouds) are the district's own supply.
    pub fn is_local(self) -> bool {
        !matches!(self, PoolKind::External)
    }

    /// The name used in fleet files and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            PoolKind::LocalCentre => "local_centre",
            PoolKind::LocalCloud => "local_cloud",
            PoolKind::External => "external",
        }
    }
}

/// A validated pool: where it is and what node groups it holds.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct PoolSpec {
    /// Unique id, e.g. `futian-aicc`.
    pub id: String,
    /// Human-readable name.
    pub name: String,
    /// Local centre, local cloud or external.
    pub kind: PoolKind,
    /// Province-city, e.g. `guizhou-guiyang`.
    pub region: String,
    /// Network round trip from the district in milliseconds.
    pub rtt_ms: u32,
    /// Data zone, e.g. `mainland` or `hetao`.
    pub data_zone: String,
    /// Node groups, each of identical nodes.
    pub groups: Vec<GroupSpec>,
    /// The pool's minimum billing increment in seconds: running time is billed rounded up to
    /// it (60 bills per started minute). `None` bills to the millisecond.
    pub billing_increment_s: Option<u32>,
}

/// A validated node group: `nodes` identical nodes of `devices_per_node` devices of one model.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct GroupSpec {
    /// Catalogue id of the accelerator model.
    pub model: String,
    /// Devices on each node, 1..=16.
    pub devices_per_node: u16,
    /// Number of nodes, at least 1.
    pub nodes: u32,
    /// Interconnect between devices, e.g. `nvlink`, `hccs`, `pcie`.
    pub interconnect: String,
    /// Price of one device for one hour, in fen.
    pub price_fen_per_device_hour: u64,
}

/// A fleet file: a name and its pools.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fleet {
    /// The fleet's name, e.g. `futian-2024`.
    pub name: String,
    /// Pools in file order.
    pub pools: Vec<PoolSpec>,
}

/// A fleet or pool that cannot be used, with the pool and field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FleetError {
    /// The text is not valid TOML or lacks a required key (the message has the line).
    #[error("fleet: {0}")]
    Parse(String),
    /// A field of a pool is invalid.
    #[error("pool {pool}: field {field}: {reason}")]
    Invalid {
        /// The pool's id (or its position when it has no id).
        pool: String,
        /// The offending field, e.g. `group[2].nodes`.
        field: String,
        /// What is wrong.
        reason: String,
    },
}

fn invalid(pool: &str, field: impl Into<String>, reason: impl Into<String>) -> FleetError {
    FleetError::Invalid {
        pool: pool.to_string(),
        field: field.into(),
        reason: reason.into(),
    }
}

/// Fleet file as written; numbers are signed so a negative value gets a named error, not a
/// generic parse failure.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FleetFile {
    name: String,
    #[serde(default)]
    pool: Vec<PoolFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolFile {
    id: String,
    name: Option<String>,
    kind: PoolKind,
    region: String,
    rtt_ms: i64,
    data_zone: String,
    billing_increment_s: Option<i64>,
    #[serde(default)]
    group: Vec<GroupFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupFile {
    model: String,
    devices_per_node: i64,
    nodes: i64,
    interconnect: String,
    price_fen_per_device_hour: i64,
}

fn in_range<T: TryFrom<i64>>(
    pool: &str,
    field: String,
    value: i64,
    min: i64,
    max: i64,
) -> Result<T, FleetError> {
    if value < min || value > max {
        return Err(invalid(
            pool,
            field,
            format!("{value} is out of range {min}..={max}"),
        ));
    }
    T::try_from(value).map_err(|_| invalid(pool, "?", "unrepresentable"))
}

impl PoolFile {
    fn into_spec(self) -> Result<PoolSpec, FleetError> {
        let id = self.id;
        let rtt_ms = in_range(&id, "rtt_ms".into(), self.rtt_ms, 0, 60_000)?;
        let billing_increment_s = self
            .billing_increment_s
            .map(|s| {
                in_range(
                    &id,
                    "billing_increment_s".into(),
                    s,
                    1,
                    MAX_BILLING_INCREMENT_S.into(),
                )
            })
            .transpose()?;
        let mut groups = Vec::with_capacity(self.group.len());
        for (i, g) in self.group.into_iter().enumerate() {
            groups.push(GroupSpec {
                devices_per_node: in_range(
                    &id,
                    format!("group[{i}].devices_per_node"),
                    g.devices_per_node,
                    1,
                    MAX_DEVICES_PER_NODE as i64,
                )?,
                nodes: in_range(&id, format!("group[{i}].nodes"), g.nodes, 1, 1_000_000)?,
                price_fen_per_device_hour: in_range(
                    &id,
                    format!("group[{i}].price_fen_per_device_hour"),
                    g.price_fen_per_device_hour,
                    0,
                    100_000_000,
                )?,
                model: g.model,
                interconnect: g.interconnect,
            });
        }
        Ok(PoolSpec {
            name: self.name.unwrap_or_else(|| id.clone()),
            id,
            kind: self.kind,
            region: self.region,
            rtt_ms,
            data_zone: self.data_zone,
            groups,
            billing_increment_s,
        })
    }
}

impl PoolSpec {
    /// Checks what a fleet file cannot express by type: a known model for every group, a
    /// non-empty id, region and zone, at least one group, and sizes in range.
    pub fn validate(&self, catalogue: &Catalogue) -> Result<(), FleetError> {
        let id = self.id.as_str();
        if id.is_empty() {
            return Err(invalid("(unnamed)", "id", "must not be empty"));
        }
        if self.region.is_empty() {
            return Err(invalid(id, "region", "must not be empty"));
        }
        if self.data_zone.is_empty() {
            return Err(invalid(id, "data_zone", "must not be empty"));
        }
        if self.groups.is_empty() {
            return Err(invalid(id, "group", "a pool needs at least one node group"));
        }
        if let Some(s) = self.billing_increment_s
            && !(1..=MAX_BILLING_INCREMENT_S).contains(&s)
        {
            return Err(invalid(
                id,
                "billing_increment_s",
                format!("{s} is out of range 1..={MAX_BILLING_INCREMENT_S}"),
            ));
        }
        for (i, g) in self.groups.iter().enumerate() {
            if catalogue.lookup(&g.model).is_none() {
                return Err(invalid(
                    id,
                    format!("group[{i}].model"),
                    format!("unknown accelerator model {:?}", g.model),
                ));
            }
            if g.nodes == 0 {
                return Err(invalid(
                    id,
                    format!("group[{i}].nodes"),
                    "must be at least 1",
                ));
            }
            if g.devices_per_node == 0 || g.devices_per_node > MAX_DEVICES_PER_NODE {
                return Err(invalid(
                    id,
                    format!("group[{i}].devices_per_node"),
                    format!("must be 1..={MAX_DEVICES_PER_NODE}"),
                ));
            }
        }
        Ok(())
    }

    /// Total rated capacity in TFLOPS.
    pub fn capacity_tflops(&self, catalogue: &Catalogue) -> Tflops {
        self.groups
            .iter()
            .filter_map(|g| {
                let m = catalogue.lookup(&g.model)?;
                Some(
                    g.nodes as u64
                        * g.devices_per_node as u64
                        * catalogue.model(m).fp16_dense_tflops as u64,
                )
            })
            .sum()
    }
}

impl Fleet {
    /// Parses and validates a fleet file: unknown models, zero nodes, duplicate pool ids,
    /// negative prices and the like are errors naming the pool and the field.
    pub fn from_toml(text: &str, catalogue: &Catalogue) -> Result<Self, FleetError> {
        let file: FleetFile = toml::from_str(text).map_err(|e| FleetError::Parse(e.to_string()))?;
        let mut seen = BTreeSet::new();
        let mut pools = Vec::with_capacity(file.pool.len());
        for (i, p) in file.pool.into_iter().enumerate() {
            if p.id.is_empty() {
                return Err(invalid(&format!("#{i}"), "id", "must not be empty"));
            }
            if !seen.insert(p.id.clone()) {
                return Err(invalid(&p.id, "id", "duplicate pool id"));
            }
            let spec = p.into_spec()?;
            spec.validate(catalogue)?;
            pools.push(spec);
        }
        Ok(Fleet {
            name: file.name,
            pools,
        })
    }

    /// Total rated capacity in TFLOPS.
    pub fn capacity_tflops(&self, catalogue: &Catalogue) -> Tflops {
        self.pools
            .iter()
            .map(|p| p.capacity_tflops(catalogue))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::TFLOPS_PER_P;

    const ONE_POOL: &str = r#"
        name = "t"
        [[pool]]
        id = "p1"
        kind = "external"
        region = "guizhou-guiyang"
        rtt_ms = 30
        data_zone = "mainland"
        [[pool.group]]
        model = "h100"
        devices_per_node = 8
        nodes = 4
        interconnect = "nvlink"
        price_fen_per_device_hour = 2500
    "#;

    fn err(text: &str) -> String {
        Fleet::from_toml(text, &Catalogue::builtin())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn a_valid_pool_loads() {
        let f = Fleet::from_toml(ONE_POOL, &Catalogue::builtin()).unwrap();
        assert_eq!(f.pools.len(), 1);
        assert_eq!(f.pools[0].name, "p1");
        assert_eq!(f.capacity_tflops(&Catalogue::builtin()), 4 * 8 * 989);
    }

    #[test]
    fn unknown_model_names_pool_and_field() {
        assert_eq!(
            err(&ONE_POOL.replace("\"h100\"", "\"h999\"")),
            "pool p1: field group[0].model: unknown accelerator model \"h999\""
        );
    }

    #[test]
    fn zero_nodes_names_pool_and_field() {
        assert_eq!(
            err(&ONE_POOL.replace("nodes = 4", "nodes = 0")),
            "pool p1: field group[0].nodes: 0 is out of range 1..=1000000"
        );
    }

    #[test]
    fn negative_price_names_pool_and_field() {
        let e = err(&ONE_POOL.replace("= 2500", "= -5"));
        assert!(
            e.starts_with("pool p1: field group[0].price_fen_per_device_hour: -5"),
            "{e}"
        );
    }

    #[test]
    fn a_billing_increment_is_read_and_checked() {
        let with = |v: &str| {
            ONE_POOL.replace(
                "rtt_ms = 30",
                &format!("rtt_ms = 30\nbilling_increment_s = {v}"),
            )
        };
        let f = Fleet::from_toml(&with("60"), &Catalogue::builtin()).unwrap();
        assert_eq!(f.pools[0].billing_increment_s, Some(60));
        let f = Fleet::from_toml(ONE_POOL, &Catalogue::builtin()).unwrap();
        assert_eq!(
            f.pools[0].billing_increment_s, None,
            "absent: to the millisecond"
        );
        assert_eq!(
            err(&with("0")),
            "pool p1: field billing_increment_s: 0 is out of range 1..=86400"
        );
        let mut spec = f.pools[0].clone();
        spec.billing_increment_s = Some(86_401);
        assert_eq!(
            spec.validate(&Catalogue::builtin())
                .unwrap_err()
                .to_string(),
            "pool p1: field billing_increment_s: 86401 is out of range 1..=86400"
        );
    }

    #[test]
    fn duplicate_pool_id_is_named() {
        let two = format!(
            "{ONE_POOL}{}",
            &ONE_POOL[ONE_POOL.find("[[pool]]").unwrap()..]
        );
        assert_eq!(err(&two), "pool p1: field id: duplicate pool id");
    }

    #[test]
    fn syntax_errors_carry_the_line() {
        let e = err("name = \"x\"\n[[pool]]\nid = \n");
        assert!(e.contains("line 3"), "{e}");
    }

    #[test]
    fn builtin_fleets_meet_the_district_figures() {
        let c = Catalogue::builtin();
        let f24 = Fleet::from_toml(FUTIAN_2024, &c).unwrap();
        let f25 = Fleet::from_toml(FUTIAN_2025, &c).unwrap();
        let local: Tflops = f24
            .pools
            .iter()
            .filter(|p| p.kind.is_local())
            .map(|p| p.capacity_tflops(&c))
            .sum();
        let external = f24.pools.iter().filter(|p| !p.kind.is_local()).count();
        assert!(local >= 4000 * TFLOPS_PER_P, "local {local}");
        assert!(external >= 140, "external pools {external}");
        assert!(f24.capacity_tflops(&c) >= 10_000 * TFLOPS_PER_P);
        assert!(f25.capacity_tflops(&c) >= 20_000 * TFLOPS_PER_P);
    }
}
