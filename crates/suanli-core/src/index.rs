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
        // Climb only while the aggregates change: a maximum over many groups rarely does.
        while i > 1 {
            i /= 2;
            let before = (self.max_node_free[i], self.free[i]);
            self.pull(i);
            if before == (self.max_node_free[i], self.free[i]) {
                break;
            }
        }
    }

    fn fits(&self, i: usize, m: u16, need: u64) -> bool {
        self.max_node_free[i] >= m && self.free[i] >= need
    }

    /// The first leaf at or after `from` whose group may hold a node with `m` free devices and
    /// `need` free devices in all. A necessary condition only: the caller checks the group.
    ///
    /// An in-order walk without recursion: a subtree that may fit is entered at its left child,
    /// one that cannot is skipped for the next subtree to its right. The two maxima of a subtree
    /// may come from different leaves, so entering a subtree can still end in a dead end; the walk
    /// then simply moves on.
    pub fn find_first(&self, from: usize, m: u16, need: u64) -> Option<usize> {
        if from >= self.groups.len() {
            return None;
        }
        let mut i = self.size + from;
        loop {
            if self.fits(i, m, need) {
                if i >= self.size {
                    let leaf = i - self.size;
                    return (leaf < self.groups.len()).then_some(leaf);
                }
                i *= 2;
                continue;
            }
            while i & 1 == 1 {
                i >>= 1; // a right child: what follows it starts right of its parent
            }
            if i == 0 {
                return None;
            }
            i += 1;
        }
    }

    /// The group at a leaf.
    pub fn group(&self, leaf: usize) -> u32 {
        self.groups[leaf]
    }

    /// Every leaf in order with the stats recorded for its group, for audits.
    pub(crate) fn leaves(&self) -> impl Iterator<Item = (u32, GroupStats)> + '_ {
        self.groups.iter().enumerate().map(|(leaf, &g)| {
            let i = self.size + leaf;
            let s = GroupStats {
                max_node_free: self.max_node_free[i],
                free_devices: self.free[i],
            };
            (g, s)
        })
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
///
/// The static orders are kept current on every change. The best-fit set is brought up to date
/// lazily, when a best-fit placement asks ([`Index::flush_best_fit`]): most requests use another
/// policy, and a sorted-set update on every allocation would cost them for nothing.
#[derive(Clone, Debug, Default)]
pub(crate) struct Index {
    pub models: Vec<ModelIndex>,
    leaf_cheapest: Vec<u32>,
    leaf_latency: Vec<u32>,
    /// The key under which a group is in `by_free`, if it is.
    free_key: Vec<Option<u64>>,
    /// The key it should have now; differs from `free_key` only for groups in `dirty`.
    latest_key: Vec<Option<u64>>,
    dirty: Vec<u32>,
    is_dirty: Vec<bool>,
}

fn best_fit_key(s: GroupStats) -> Option<u64> {
    (s.max_node_free > 0).then_some(s.free_devices)
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
        self.latest_key.resize(n, None);
        self.is_dirty.resize(n, false);

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
            let key = best_fit_key(stats[g as usize]);
            if let Some(k) = key {
                mi.by_free.insert((k, g));
            }
            self.free_key[g as usize] = key;
            self.latest_key[g as usize] = key;
        }
    }

    /// Records a group's new free capacity in every order of its model.
    pub fn refresh(&mut self, model: usize, group: u32, s: GroupStats) {
        let g = group as usize;
        let mi = &mut self.models[model];
        mi.cheapest.set(self.leaf_cheapest[g] as usize, s);
        mi.latency.set(self.leaf_latency[g] as usize, s);
        self.latest_key[g] = best_fit_key(s);
        if !self.is_dirty[g] && self.latest_key[g] != self.free_key[g] {
            self.is_dirty[g] = true;
            self.dirty.push(group);
        }
    }

    /// Brings every best-fit set up to date. `model_of` gives a group's model.
    pub fn flush_best_fit(&mut self, model_of: impl Fn(u32) -> usize) {
        for group in std::mem::take(&mut self.dirty) {
            let g = group as usize;
            self.is_dirty[g] = false;
            let (old, new) = (self.free_key[g], self.latest_key[g]);
            if old == new {
                continue;
            }
            let set = &mut self.models[model_of(group)].by_free;
            if let Some(k) = old {
                set.remove(&(k, group));
            }
            if let Some(k) = new {
                set.insert((k, group));
            }
            self.free_key[g] = new;
        }
    }

    /// The key each group should have in the best-fit set once flushed, for audits.
    pub fn best_fit_keys(&self) -> &[Option<u64>] {
        &self.latest_key
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

    proptest::proptest! {
        /// The tree finds exactly the first leaf a linear scan finds, from any start.
        #[test]
        fn find_first_agrees_with_a_linear_scan(
            leaves in proptest::collection::vec((0u16..9, 0u64..40), 1..40),
            from in 0usize..45,
            m in 1u16..9,
            need in 1u64..40,
        ) {
            let s = stats(&leaves);
            let t = OrderTree::build((0..leaves.len() as u32).collect(), &s);
            let scan = (from..leaves.len()).find(|&l| leaves[l].0 >= m && leaves[l].1 >= need);
            proptest::prop_assert_eq!(t.find_first(from, m, need), scan);
        }
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
        let first = |ix: &Index| ix.models[0].by_free.iter().next().copied();
        assert_eq!(first(&ix), Some((8, 0)), "not yet flushed");
        ix.flush_best_fit(|_| 0);
        assert_eq!(first(&ix), Some((4, 1)));
    }
}
