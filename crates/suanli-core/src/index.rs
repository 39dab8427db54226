//! Capacity indexes over node groups, one per accelerator model, so that placement visits the
//! groups in policy order and skips busy ones without scanning the fleet.
//!
//! For the two static orders (cheapest, lowest latency) an [`OrderTree`] keeps the groups as
//! leaves of a segment tree whose inner nodes hold the largest "most free devices on one node"
//! and the largest "free devices" below them: the first group in order that may fit a request is
//! found in O(log groups), however many busy groups come before it. Best fit, whose order
//! changes with every allocation, uses a sorted set keyed by free devices.

use std::collections::BTreeSet;

/// What placement needs to know about a group to skip it. Zero for groups that cannot take
/// new work (draining or lost pools).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct GroupStats {
    pub max_node_free: u16,
    pub free_devices: u64,
}

/// A segment tree over groups in one fixed order.
#[derive(Clone, Debug, Default)]
pub(crate) struct OrderTree {
    size: usize,
    groups: Vec<u32>,
    max_node_free: Vec<u16>,
    free: Vec<u64>,
}

impl OrderTree {
    fn build(groups: Vec<u32>, stats: &[GroupStats]) -> Self {
        let size = groups.len().next_power_of_two().max(1);
        let mut t = OrderTree {
            size,
            max_node_free: vec![0; 2 * size],
            free: vec![0; 2 * size],
            groups,
        };
        for (leaf, &g) in t.groups.iter().enumerate() {
            let s = stats[g as usize];
            t.max_node_free[size + leaf] = s.max_node_free;
            t.free[size + leaf] = s.free_devices;
        }
        for i in (1..size).rev() {
            t.pull(i);
        }
        t
    }

    fn pull(&mut self, i: usize) {
        self.max_node_free[i] = self.max_node_free[2 * i].max(self.max_node_free[2 * i + 1]);
        self.free[i] = self.free[2 * i].max(self.free[2 * i + 1]);
    }

    fn set(&mut self, leaf: usize, s: GroupStats) {
        let mut i = self.size + leaf;
        if self.max_node_free[i] == s.max_node_free && self.free[i] == s.free_devices {
            return;
        }
        self.max_node_free[i] = s.max_node_free;
        self.free[i] = s.free_devices;
        while i > 1 {
            i /= 2;
            self.pull(i);
        }
    }

    fn fits(&self, i: usize, m: u16, need: u64) -> bool {
        self.max_node_free[i] >= m && self.free[i] >= need
    }

    /// The first leaf at or after `from` whose group may hold a node with `m` free devices and
    /// `need` free devices in all. A necessary condition only: the caller checks the group.
    pub fn find_first(&self, from: usize, m: u16, need: u64) -> Option<usize> {
        if from >= self.groups.len() || !self.fits(1, m, need) {
            return None;
        }
        self.descend(1, 0, self.size, from, m, need)
    }

    fn descend(
        &self,
        i: usize,
        lo: usize,
        hi: usize,
        from: usize,
        m: u16,
        need: u64,
    ) -> Option<usize> {
        if hi <= from || !self.fits(i, m, need) {
            return None;
        }
        if hi - lo == 1 {
            return Some(lo);
        }
        let mid = (lo + hi) / 2;
        self.descend(2 * i, lo, mid, from, m, need)
            .or_else(|| self.descend(2 * i + 1, mid, hi, from, m, need))
    }

    /// The group at a leaf.
    pub fn group(&self, leaf: usize) -> u32 {
        self.groups[leaf]
    }
}

/// The orders of one model's groups.
#[derive(Clone, Debug, Default)]
pub(crate) struct ModelIndex {
    pub cheapest: OrderTree,
    pub latency: OrderTree,
    /// (free devices, group) of the model's available groups, for best fit.
    pub by_free: BTreeSet<(u64, u32)>,
}

/// The sort keys of a group in the static orders.
#[derive(Clone, Copy, Debug)]
pub(crate) struct OrderKeys {
    pub price: u64,
    pub rtt_ms: u32,
    pub local: bool,
}

/// Indexes of every model, and where each group sits in them.
#[derive(Clone, Debug, Default)]
pub(crate) struct Index {
    pub models: Vec<ModelIndex>,
    leaf_cheapest: Vec<u32>,
    leaf_latency: Vec<u32>,
    /// The key under which a group is in `by_free`, if it is.
    free_key: Vec<Option<u64>>,
}

impl Index {
    pub fn new(models: usize) -> Self {
        Index {
            models: vec![ModelIndex::default(); models],
            ..Default::default()
        }
    }

    /// Rebuilds one model's orders from scratch: after a pool registers or its prices or RTT
    /// change. `groups` lists the model's groups with their keys; `stats` is indexed by group.
    pub fn rebuild_model(
        &mut self,
        model: usize,
        groups: &[(u32, OrderKeys)],
        stats: &[GroupStats],
    ) {
        let n = stats.len();
        self.leaf_cheapest.resize(n, 0);
        self.leaf_latency.resize(n, 0);
        self.free_key.resize(n, None);

        let mut by_price: Vec<(u64, u32, u32)> = groups
            .iter()
            .map(|&(g, k)| (k.price, k.rtt_ms, g))
            .collect();
        by_price.sort_unstable();
        let mut by_latency: Vec<(bool, u32, u64, u32)> = groups
            .iter()
            .map(|&(g, k)| (!k.local, k.rtt_ms, k.price, g))
            .collect();
        by_latency.sort_unstable();

        for (leaf, &(_, _, g)) in by_price.iter().enumerate() {
            self.leaf_cheapest[g as usize] = leaf as u32;
        }
        for (leaf, &(_, _, _, g)) in by_latency.iter().enumerate() {
            self.leaf_latency[g as usize] = leaf as u32;
        }
        let mi = &mut self.models[model];
        mi.cheapest = OrderTree::build(by_price.iter().map(|e| e.2).collect(), stats);
        mi.latency = OrderTree::build(by_latency.iter().map(|e| e.3).collect(), stats);
        mi.by_free.clear();
        for &(g, _) in groups {
            let s = stats[g as usize];
            let key = (s.max_node_free > 0).then_some(s.free_devices);
            if let Some(k) = key {
                mi.by_free.insert((k, g));
            }
            self.free_key[g as usize] = key;
        }
    }

    /// Records a group's new free capacity in every order of its model.
    pub fn refresh(&mut self, model: usize, group: u32, s: GroupStats) {
        let g = group as usize;
        let mi = &mut self.models[model];
        mi.cheapest.set(self.leaf_cheapest[g] as usize, s);
        mi.latency.set(self.leaf_latency[g] as usize, s);
        let key = (s.max_node_free > 0).then_some(s.free_devices);
        if self.free_key[g] != key {
            if let Some(old) = self.free_key[g] {
                mi.by_free.remove(&(old, group));
            }
            if let Some(k) = key {
                mi.by_free.insert((k, group));
            }
            self.free_key[g] = key;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(v: &[(u16, u64)]) -> Vec<GroupStats> {
        v.iter()
            .map(|&(m, f)| GroupStats {
                max_node_free: m,
                free_devices: f,
            })
            .collect()
    }

    #[test]
    fn find_first_skips_groups_that_cannot_fit() {
        let s = stats(&[(8, 8), (2, 40), (8, 64), (0, 0), (8, 16)]);
        let t = OrderTree::build(vec![0, 1, 2, 3, 4], &s);
        assert_eq!(t.find_first(0, 8, 8), Some(0));
        assert_eq!(t.find_first(1, 8, 8), Some(2));
        assert_eq!(t.find_first(0, 8, 16), Some(2));
        assert_eq!(t.find_first(3, 8, 16), Some(4));
        assert_eq!(t.find_first(0, 9, 1), None);
        assert_eq!(t.find_first(5, 1, 1), None);
    }

    #[test]
    fn set_updates_the_aggregates() {
        let s = stats(&[(8, 8), (8, 8)]);
        let mut t = OrderTree::build(vec![0, 1], &s);
        t.set(0, GroupStats::default());
        assert_eq!(t.find_first(0, 1, 1), Some(1));
        t.set(1, GroupStats::default());
        assert_eq!(t.find_first(0, 1, 1), None);
    }

    #[test]
    fn rebuild_orders_by_price_and_by_latency() {
        let s = stats(&[(8, 8), (8, 8), (8, 8)]);
        let keys = [
            (
                0,
                OrderKeys {
                    price: 30,
                    rtt_ms: 1,
                    local: true,
                },
            ),
            (
                1,
                OrderKeys {
                    price: 10,
                    rtt_ms: 40,
                    local: false,
                },
            ),
            (
                2,
                OrderKeys {
                    price: 20,
                    rtt_ms: 5,
                    local: false,
                },
            ),
        ];
        let mut ix = Index::new(1);
        ix.rebuild_model(0, &keys, &s);
        let m = &ix.models[0];
        let cheapest: Vec<u32> = (0..3).map(|l| m.cheapest.group(l)).collect();
        let latency: Vec<u32> = (0..3).map(|l| m.latency.group(l)).collect();
        assert_eq!(cheapest, [1, 2, 0]);
        assert_eq!(latency, [0, 2, 1]);
        ix.refresh(
            0,
            1,
            GroupStats {
                max_node_free: 8,
                free_devices: 4,
            },
        );
        assert_eq!(ix.models[0].by_free.iter().next(), Some(&(4, 1)));
    }
}
