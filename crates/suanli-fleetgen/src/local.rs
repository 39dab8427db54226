//! The district's own supply, written out by hand: it is a handful of known facilities, not a
//! market to sample. Sized so that the three pools hold about 4100P at the end of 2024.

use crate::fleet::{DataZone, Group, Interconnect, Pool, PoolKind};

const SHENZHEN: &str = "guangdong-shenzhen";

/// The district's own pools bill per started minute.
const PER_STARTED_MINUTE: u32 = 60;

/// The three local pools as of the end of 2024: about 3036P in the compute centre, 778P and
/// 293P in the two cloud platforms.
pub(crate) fn pools_2024() -> Vec<Pool> {
    vec![
        Pool {
            id: "futian-aicc".into(),
            name: "Futian AI Computing Centre".into(),
            kind: PoolKind::LocalCentre,
            region: SHENZHEN,
            rtt_ms: 1,
            data_zone: DataZone::Mainland,
            billing_increment_s: Some(PER_STARTED_MINUTE),
            groups: vec![
                eight_per_node("ascend-910b", 1000, Interconnect::Hccs, 700),
                eight_per_node("h800", 40, Interconnect::Nvlink, 1400),
                eight_per_node("a800", 64, Interconnect::Nvlink, 700),
            ],
        },
        Pool {
            id: "futian-cloud".into(),
            name: "Futian Cloud AI Platform".into(),
            kind: PoolKind::LocalCloud,
            region: SHENZHEN,
            rtt_ms: 2,
            data_zone: DataZone::Mainland,
            billing_increment_s: Some(PER_STARTED_MINUTE),
            groups: vec![
                eight_per_node("h800", 48, Interconnect::Nvlink, 1450),
                eight_per_node("a800", 96, Interconnect::Nvlink, 720),
                eight_per_node("rtx4090", 120, Interconnect::Pcie, 200),
            ],
        },
        Pool {
            id: "hetao-cloud".into(),
            name: "Hetao Cross-Border Cloud Platform".into(),
            kind: PoolKind::LocalCloud,
            region: SHENZHEN,
            // One more hop through the cross-border zone's gateway.
            rtt_ms: 3,
            data_zone: DataZone::Hetao,
            billing_increment_s: Some(PER_STARTED_MINUTE),
            groups: vec![
                eight_per_node("h800", 24, Interconnect::Nvlink, 1500),
                eight_per_node("h20", 48, Interconnect::Nvlink, 500),
                eight_per_node("l40s", 16, Interconnect::Pcie, 450),
            ],
        },
    ]
}

/// The compute centre's 2025 expansion: a new hall of Ascend 910B nodes, about 1638P.
pub(crate) fn centre_growth_2025() -> Group {
    eight_per_node("ascend-910b", 640, Interconnect::Hccs, 650)
}

/// Every local node is an 8-device server.
fn eight_per_node(
    model: &'static str,
    nodes: u32,
    interconnect: Interconnect,
    price_fen_per_device_hour: u32,
) -> Group {
    Group {
        model,
        devices_per_node: 8,
        nodes,
        interconnect,
        price_fen_per_device_hour,
    }
}
