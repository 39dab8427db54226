//! The fleet as data, its totals, and its rendering to the fleet TOML schema.

use std::fmt::{self, Write as _};

use crate::catalogue::Catalogue;

/// TFLOPS in one P (one petaFLOPS of dense FP16).
const TFLOPS_PER_P: u64 = 1000;

/// What a pool is to the district.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PoolKind {
    LocalCentre,
    LocalCloud,
    External,
}

impl PoolKind {
    fn as_str(self) -> &'static str {
        match self {
            PoolKind::LocalCentre => "local_centre",
            PoolKind::LocalCloud => "local_cloud",
            PoolKind::External => "external",
        }
    }
}

/// Where a pool's data may legally live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DataZone {
    Mainland,
    /// The Hetao Shenzhen-Hong Kong cross-border zone.
    Hetao,
}

impl DataZone {
    fn as_str(self) -> &'static str {
        match self {
            DataZone::Mainland => "mainland",
            DataZone::Hetao => "hetao",
        }
    }
}

/// How the devices inside one node talk to each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Interconnect {
    Nvlink,
    Pcie,
    Hccs,
    InfinityFabric,
}

impl Interconnect {
    fn as_str(self) -> &'static str {
        match self {
            Interconnect::Nvlink => "nvlink",
            Interconnect::Pcie => "pcie",
            Interconnect::Hccs => "hccs",
            Interconnect::InfinityFabric => "infinity-fabric",
        }
    }
}

/// A node group: identical nodes of one accelerator model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Group {
    /// A catalogue id.
    pub model: &'static str,
    pub devices_per_node: u32,
    pub nodes: u32,
    pub interconnect: Interconnect,
    pub price_fen_per_device_hour: u32,
}

impl Group {
    pub fn tflops(&self, catalogue: &Catalogue) -> u64 {
        u64::from(self.nodes) * u64::from(self.devices_per_node) * catalogue.tflops(self.model)
    }
}

/// A place where compute lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Pool {
    pub id: String,
    pub name: String,
    pub kind: PoolKind,
    pub region: &'static str,
    pub rtt_ms: u32,
    pub data_zone: DataZone,
    /// Running time is billed rounded up to this many seconds; `None` bills to the ms.
    pub billing_increment_s: Option<u32>,
    pub groups: Vec<Group>,
}

impl Pool {
    pub fn tflops(&self, catalogue: &Catalogue) -> u64 {
        self.groups
            .iter()
            .map(|group| group.tflops(catalogue))
            .sum()
    }
}

/// A whole fleet, plus the prose that heads its file.
#[derive(Clone, Debug)]
pub(crate) struct Fleet {
    pub name: String,
    /// Comment lines (without `# `) saying what the fleet is and how to regenerate it.
    pub description: Vec<String>,
    pub pools: Vec<Pool>,
}

/// Pool count and schedulable capacity of a fleet, in TFLOPS of dense FP16.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FleetTotals {
    /// Number of pools.
    pub pools: usize,
    /// Capacity of the district's own pools (the local centre and the local clouds).
    pub local_tflops: u64,
    /// Capacity of the external pools connected to the platform.
    pub external_tflops: u64,
}

impl FleetTotals {
    /// Local plus external capacity.
    pub fn total_tflops(&self) -> u64 {
        self.local_tflops + self.external_tflops
    }
}

impl fmt::Display for FleetTotals {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} pools; local {}; external {}; total {}",
            self.pools,
            InP(self.local_tflops),
            InP(self.external_tflops),
            InP(self.total_tflops()),
        )
    }
}

/// Displays TFLOPS as P with one decimal, using integer arithmetic only.
struct InP(u64);

impl fmt::Display for InP {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tenths = (self.0 + TFLOPS_PER_P / 20) / (TFLOPS_PER_P / 10);
        write!(f, "{}.{}P", tenths / 10, tenths % 10)
    }
}

impl Fleet {
    pub fn totals(&self, catalogue: &Catalogue) -> FleetTotals {
        let mut totals = FleetTotals {
            pools: self.pools.len(),
            local_tflops: 0,
            external_tflops: 0,
        };
        for pool in &self.pools {
            let tflops = pool.tflops(catalogue);
            match pool.kind {
                PoolKind::External => totals.external_tflops += tflops,
                PoolKind::LocalCentre | PoolKind::LocalCloud => totals.local_tflops += tflops,
            }
        }
        totals
    }

    /// Renders the fleet file: header comment, fleet name, then one `[[pool]]` block per pool.
    pub fn render(&self, totals: &FleetTotals) -> String {
        // About 250 bytes per pool and group; reserving avoids regrowing for big synthetic fleets.
        let groups: usize = self.pools.iter().map(|pool| pool.groups.len()).sum();
        let mut out = String::with_capacity(1024 + 250 * (self.pools.len() + groups));
        for line in &self.description {
            push_comment(&mut out, line);
        }
        push_comment(&mut out, "");
        for line in UNITS {
            push_comment(&mut out, line);
        }
        push_comment(&mut out, &format!("Totals: {totals}."));
        writeln!(out, "\nname = {}", toml_string(&self.name)).unwrap();
        for pool in &self.pools {
            render_pool(pool, &mut out);
        }
        out
    }
}

const UNITS: &[&str] = &[
    "Units: rtt_ms = network round trip from Futian in whole milliseconds;",
    "price_fen_per_device_hour = fen (0.01 CNY) per device-hour; capacity is counted in",
    "P = 1000 TFLOPS of dense FP16 at rated peak: nodes * devices_per_node * fp16_dense_tflops",
    "(per device, from deploy/catalogue.toml); billing_increment_s = a lease's running time",
    "is billed rounded up to this many seconds (the district's pools per started minute,",
    "external pools per started hour).",
];

fn push_comment(out: &mut String, line: &str) {
    if line.is_empty() {
        out.push_str("#\n");
    } else {
        writeln!(out, "# {line}").unwrap();
    }
}

/// Appends one `[[pool]]` block with its groups. A pool that only gained groups renders as
/// its old block followed by the new groups, so growth shows as pure additions in a diff.
pub(crate) fn render_pool(pool: &Pool, out: &mut String) {
    // Writing to a String cannot fail.
    writeln!(out, "\n[[pool]]").unwrap();
    writeln!(out, "id = {}", toml_string(&pool.id)).unwrap();
    writeln!(out, "name = {}", toml_string(&pool.name)).unwrap();
    writeln!(out, "kind = \"{}\"", pool.kind.as_str()).unwrap();
    writeln!(out, "region = {}", toml_string(pool.region)).unwrap();
    writeln!(out, "rtt_ms = {}", pool.rtt_ms).unwrap();
    writeln!(out, "data_zone = \"{}\"", pool.data_zone.as_str()).unwrap();
    if let Some(s) = pool.billing_increment_s {
        writeln!(out, "billing_increment_s = {s}").unwrap();
    }
    for group in &pool.groups {
        writeln!(out, "\n[[pool.group]]").unwrap();
        writeln!(out, "model = {}", toml_string(group.model)).unwrap();
        writeln!(out, "devices_per_node = {}", group.devices_per_node).unwrap();
        writeln!(out, "nodes = {}", group.nodes).unwrap();
        writeln!(out, "interconnect = \"{}\"", group.interconnect.as_str()).unwrap();
        writeln!(
            out,
            "price_fen_per_device_hour = {}",
            group.price_fen_per_device_hour
        )
        .unwrap();
    }
}

/// A TOML basic string. Our strings are plain ASCII, so escaping `"` and `\` suffices.
fn toml_string(value: &str) -> String {
    debug_assert!(value.chars().all(|c| c.is_ascii() && !c.is_ascii_control()));
    format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
}
