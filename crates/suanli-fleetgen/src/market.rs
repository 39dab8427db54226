//! The market the external pools are drawn from: regions, accelerator offers and pool sizes.
//!
//! These tables are a model of the Chinese compute market around 2024-2025, chosen to be
//! realistic in shape (where pools are, what they hold, how big they are, what they cost), not
//! a register of real operators or quotes.

use std::ops::RangeInclusive;

use crate::fleet::Interconnect;

/// A province-city where external pools live.
pub(crate) struct Region {
    /// Lowercase `province-city`, as written in fleet files.
    pub id: &'static str,
    /// Lowercase city, used in pool ids.
    pub city: &'static str,
    /// City as people write it, used in pool names.
    pub city_name: &'static str,
    /// Great-circle distance from Futian in km (precomputed, so no floating point is needed).
    pub distance_km: u32,
    /// Regional price level in percent of the base price: the western "East Data West
    /// Compute" hubs have cheap power and land, the eastern cities do not.
    pub price_percent: u32,
    /// Relative number of pools in this region.
    pub pool_weight: u32,
    /// Percent of pools here that sit in the Hetao cross-border data zone.
    pub hetao_percent: u32,
}

const fn region(
    id: &'static str,
    city: &'static str,
    city_name: &'static str,
    distance_km: u32,
    price_percent: u32,
    pool_weight: u32,
) -> Region {
    Region {
        id,
        city,
        city_name,
        distance_km,
        price_percent,
        pool_weight,
        hetao_percent: 0,
    }
}

/// Columns: id, city, city name, km from Futian, price level in percent, pool weight.
#[rustfmt::skip]
pub(crate) const REGIONS: &[Region] = &[
    // Guangdong, including the Shaoguan national hub cluster.
    Region { hetao_percent: 25, ..region("guangdong-shenzhen", "shenzhen", "Shenzhen", 14, 112, 12) },
    region("guangdong-dongguan", "dongguan", "Dongguan", 64, 106, 5),
    region("guangdong-guangzhou", "guangzhou", "Guangzhou", 106, 108, 9),
    region("guangdong-foshan", "foshan", "Foshan", 110, 104, 3),
    region("guangdong-shaoguan", "shaoguan", "Shaoguan", 259, 92, 6),
    // South and central China.
    region("guangxi-nanning", "nanning", "Nanning", 584, 95, 2),
    region("fujian-xiamen", "xiamen", "Xiamen", 466, 104, 2),
    region("hunan-changsha", "changsha", "Changsha", 645, 98, 3),
    region("hubei-wuhan", "wuhan", "Wuhan", 898, 100, 5),
    region("henan-zhengzhou", "zhengzhou", "Zhengzhou", 1361, 98, 2),
    // Yangtze River Delta, including the Wuhu hub cluster.
    region("shanghai-shanghai", "shanghai", "Shanghai", 1216, 115, 8),
    region("zhejiang-hangzhou", "hangzhou", "Hangzhou", 1054, 110, 6),
    region("jiangsu-nanjing", "nanjing", "Nanjing", 1160, 106, 3),
    region("jiangsu-suzhou", "suzhou", "Suzhou", 1171, 106, 3),
    region("anhui-wuhu", "wuhu", "Wuhu", 1073, 94, 4),
    region("anhui-hefei", "hefei", "Hefei", 1081, 100, 2),
    // Beijing-Tianjin-Hebei, including the Zhangjiakou hub cluster.
    region("beijing-beijing", "beijing", "Beijing", 1945, 115, 7),
    region("tianjin-tianjin", "tianjin", "Tianjin", 1871, 104, 2),
    region("hebei-zhangjiakou", "zhangjiakou", "Zhangjiakou", 2031, 90, 4),
    // Chengdu-Chongqing hub (Tianfu and Chongqing clusters).
    region("sichuan-chengdu", "chengdu", "Chengdu", 1342, 94, 5),
    region("sichuan-yaan", "yaan", "Ya'an", 1378, 86, 2),
    region("chongqing-chongqing", "chongqing", "Chongqing", 1083, 94, 4),
    // Western hubs: Gui'an, Qingyang, Zhongwei, Hohhot/Helinger and Ulanqab.
    region("guizhou-guiyang", "guiyang", "Guiyang", 879, 85, 8),
    region("gansu-qingyang", "qingyang", "Qingyang", 1592, 82, 5),
    region("ningxia-zhongwei", "zhongwei", "Zhongwei", 1870, 82, 5),
    region("inner-mongolia-hohhot", "hohhot", "Hohhot", 2048, 83, 6),
    region("inner-mongolia-ulanqab", "ulanqab", "Ulanqab", 2060, 83, 4),
    region("shaanxi-xian", "xian", "Xi'an", 1405, 95, 2),
];

impl Region {
    /// Network round trip from Futian before per-pool jitter: about 1 ms per 45 km of
    /// great-circle distance plus 2 ms of access, because fibre routes are longer than the
    /// great circle and cross several hops. That puts Guangzhou at 4 ms, Guiyang at about
    /// 20 ms, Shanghai at about 30 ms and Beijing or Hohhot at about 45 ms.
    pub fn base_rtt_ms(&self) -> u32 {
        2 + self.distance_km / 45
    }
}

/// One accelerator model as the market offers it: node shapes, list price and popularity.
pub(crate) struct Offer {
    /// A catalogue id.
    pub model: &'static str,
    pub interconnect: Interconnect,
    /// Devices per node, repeated by how common each shape is.
    pub devices_per_node: &'static [u32],
    /// Rough rental level in fen per device-hour before regional and per-pool variation.
    pub base_price_fen: u32,
    /// Relative share of new node groups in 2024 and in 2025.
    pub weight_2024: u32,
    pub weight_2025: u32,
}

const EIGHT: &[u32] = &[8];
/// Consumer and PCIe cards also come in 4-card boxes.
const MOSTLY_EIGHT: &[u32] = &[8, 8, 8, 4];

/// Consumer RTX 4090s and export-compliant cards (A800, H800, later H20) dominate external
/// supply; Ascend 910B grows fastest; H100, H200, L40S and MI300X stay rare.
#[rustfmt::skip]
pub(crate) const OFFERS: &[Offer] = &[
    Offer { model: "rtx4090", interconnect: Interconnect::Pcie, devices_per_node: MOSTLY_EIGHT, base_price_fen: 180, weight_2024: 30, weight_2025: 20 },
    Offer { model: "a800", interconnect: Interconnect::Nvlink, devices_per_node: EIGHT, base_price_fen: 650, weight_2024: 18, weight_2025: 8 },
    Offer { model: "h800", interconnect: Interconnect::Nvlink, devices_per_node: EIGHT, base_price_fen: 1300, weight_2024: 14, weight_2025: 12 },
    Offer { model: "ascend-910b", interconnect: Interconnect::Hccs, devices_per_node: EIGHT, base_price_fen: 650, weight_2024: 16, weight_2025: 22 },
    Offer { model: "h20", interconnect: Interconnect::Nvlink, devices_per_node: EIGHT, base_price_fen: 450, weight_2024: 10, weight_2025: 18 },
    Offer { model: "a100", interconnect: Interconnect::Nvlink, devices_per_node: EIGHT, base_price_fen: 700, weight_2024: 5, weight_2025: 3 },
    Offer { model: "h100", interconnect: Interconnect::Nvlink, devices_per_node: EIGHT, base_price_fen: 1500, weight_2024: 3, weight_2025: 4 },
    Offer { model: "l40s", interconnect: Interconnect::Pcie, devices_per_node: MOSTLY_EIGHT, base_price_fen: 400, weight_2024: 3, weight_2025: 5 },
    Offer { model: "mi300x", interconnect: Interconnect::InfinityFabric, devices_per_node: EIGHT, base_price_fen: 1200, weight_2024: 1, weight_2025: 2 },
    Offer { model: "h200", interconnect: Interconnect::Nvlink, devices_per_node: EIGHT, base_price_fen: 1900, weight_2024: 0, weight_2025: 6 },
];

/// Which year's popularity to draw models with.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Mix {
    Y2024,
    Y2025,
}

impl Offer {
    pub fn weight(&self, mix: Mix) -> u32 {
        match mix {
            Mix::Y2024 => self.weight_2024,
            Mix::Y2025 => self.weight_2025,
        }
    }
}

/// A node-count class of a node group and how often it occurs.
pub(crate) struct SizeClass {
    pub nodes: RangeInclusive<u32>,
    pub weight: u32,
}

/// Heavy-tailed node counts: most groups are a handful of nodes, a few are hundreds.
pub(crate) const SIZE_CLASSES: &[SizeClass] = &[
    SizeClass {
        nodes: 2..=4,
        weight: 45,
    },
    SizeClass {
        nodes: 5..=10,
        weight: 28,
    },
    SizeClass {
        nodes: 11..=24,
        weight: 16,
    },
    SizeClass {
        nodes: 25..=64,
        weight: 8,
    },
    SizeClass {
        nodes: 65..=200,
        weight: 3,
    },
];

/// Percent of external pools that hold a second model.
pub(crate) const SECOND_GROUP_PERCENT: u32 = 25;

/// Per-pool price variation around the regional level, in percent.
pub(crate) const PRICE_JITTER_PERCENT: RangeInclusive<u32> = 90..=110;

/// Per-pool round-trip variation on top of the regional base, in ms.
pub(crate) const RTT_JITTER_MS: RangeInclusive<u32> = 0..=2;

/// Words that make pool names read like the facilities they model.
pub(crate) const FACILITIES: &[&str] = &[
    "Intelligent Computing Centre",
    "AI Cloud Zone",
    "GPU Cluster",
    "Data Centre",
    "Computing Hub",
];
