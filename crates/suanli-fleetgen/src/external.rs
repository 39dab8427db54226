//! Seeded drawing of external pools and node groups from the market tables.

use rand::RngExt;
use rand::seq::{IndexedRandom, index};
use rand_chacha::ChaCha8Rng;

use crate::catalogue::Catalogue;
use crate::fleet::{DataZone, Group, Pool, PoolKind};
use crate::market::{
    FACILITIES, Mix, OFFERS, Offer, PRICE_JITTER_PERCENT, REGIONS, RTT_JITTER_MS, Region,
    SECOND_GROUP_PERCENT, SIZE_CLASSES,
};

/// The smallest node group the generator makes: a single node is not worth brokering.
const MIN_NODES: u32 = 2;

/// Draws external pools and groups from one random stream, numbering pools consecutively so
/// that ids stay unique however many pools are drawn.
pub(crate) struct ExternalMarket {
    rng: ChaCha8Rng,
    mix: Mix,
    next_number: usize,
}

impl ExternalMarket {
    pub fn new(rng: ChaCha8Rng, mix: Mix, first_number: usize) -> Self {
        ExternalMarket {
            rng,
            mix,
            next_number: first_number,
        }
    }

    /// A new external pool with one model, sometimes two.
    pub fn pool(&mut self) -> Pool {
        let region = REGIONS
            .choose_weighted(&mut self.rng, |region| region.pool_weight)
            .expect("REGIONS has positive weights");
        let number = self.next_number;
        self.next_number += 1;
        let facility = FACILITIES
            .choose(&mut self.rng)
            .expect("FACILITIES is not empty");
        let rtt_ms = region.base_rtt_ms() + self.rng.random_range(RTT_JITTER_MS);
        let data_zone = if self.rng.random_ratio(region.hetao_percent, 100) {
            DataZone::Hetao
        } else {
            DataZone::Mainland
        };
        let mut groups = vec![self.group(region, &[])];
        if self.rng.random_ratio(SECOND_GROUP_PERCENT, 100) {
            let first_model = groups[0].model;
            groups.push(self.group(region, &[first_model]));
        }
        Pool {
            id: format!("{}-{number:03}", region.city),
            name: format!("{} {facility} {number}", region.city_name),
            kind: PoolKind::External,
            region: region.id,
            rtt_ms,
            data_zone,
            // External compute centres sell by the started hour.
            billing_increment_s: Some(3_600),
            groups,
        }
    }

    /// A new node group in `region` of a model not in `existing_models`.
    pub fn group(&mut self, region: &Region, existing_models: &[&str]) -> Group {
        let mix = self.mix;
        let offer = OFFERS
            .choose_weighted(&mut self.rng, |offer| {
                if existing_models.contains(&offer.model) {
                    0
                } else {
                    offer.weight(mix)
                }
            })
            .expect("OFFERS has more models with positive weight than a pool holds");
        let devices_per_node = *offer
            .devices_per_node
            .choose(&mut self.rng)
            .expect("every offer has a node shape");
        let size = SIZE_CLASSES
            .choose_weighted(&mut self.rng, |class| class.weight)
            .expect("SIZE_CLASSES has positive weights");
        Group {
            model: offer.model,
            devices_per_node,
            nodes: self.rng.random_range(size.nodes.clone()),
            interconnect: offer.interconnect,
            price_fen_per_device_hour: self.price(offer, region),
        }
    }

    /// `count` distinct indices below `len`, in increasing order.
    pub fn pick_indices(&mut self, len: usize, count: usize) -> Vec<usize> {
        let mut picked = index::sample(&mut self.rng, len, count).into_vec();
        picked.sort_unstable();
        picked
    }

    /// Base price at the regional level with per-pool variation, rounded to 0.1 CNY.
    fn price(&mut self, offer: &Offer, region: &Region) -> u32 {
        let jitter_percent = self.rng.random_range(PRICE_JITTER_PERCENT);
        let fen = offer.base_price_fen * region.price_percent * jitter_percent / 10_000;
        (fen + 5) / 10 * 10
    }
}

/// The market region a pool was drawn in.
pub(crate) fn region_of(pool: &Pool) -> &'static Region {
    REGIONS
        .iter()
        .find(|region| region.id == pool.region)
        .unwrap_or_else(|| panic!("pool {} has unknown region {}", pool.id, pool.region))
}

/// Rescales node counts so that the groups together hold about `target_tflops`, keeping the
/// shape of the drawn size distribution. Drawing sizes freely and then rescaling makes the
/// fleet totals close to their targets for every seed while sizes stay random and
/// heavy-tailed.
pub(crate) fn scale_to_target(
    groups: &mut [&mut Group],
    target_tflops: u64,
    catalogue: &Catalogue,
) {
    let drawn: u64 = groups.iter().map(|group| group.tflops(catalogue)).sum();
    if drawn == 0 {
        return;
    }
    for group in groups.iter_mut() {
        // Round to nearest in u128: nodes * target can exceed u64 for huge targets.
        let scaled = (u128::from(group.nodes) * u128::from(target_tflops) * 2 + u128::from(drawn))
            / (2 * u128::from(drawn));
        group.nodes = u32::try_from(scaled).unwrap_or(u32::MAX).max(MIN_NODES);
    }
}
