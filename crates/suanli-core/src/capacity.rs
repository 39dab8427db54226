//! Free devices of one node group, tracked per node and bucketed by free count.
//!
//! `buckets[f]` lists the nodes that have exactly `f` free devices, so a gang of `n` nodes x `m`
//! devices is checked by summing at most 16 bucket lengths and taken by walking the tightest
//! buckets first (best fit inside the group), without scanning every node.

/// A piece of a lease: `devices` devices on node `node` of node group `group`.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct Slice {
    /// Global node-group index.
    pub group: u32,
    /// Node index inside the group.
    pub node: u32,
    /// Devices taken on that node.
    pub devices: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub(crate) struct NodeSet {
    devices_per_node: u16,
    free: Vec<u16>,
    pos: Vec<u32>,
    buckets: Vec<Vec<u32>>,
    free_devices: u64,
    /// Nodes out of service: filed as having no free device, and holding no lease.
    down: Vec<bool>,
    down_nodes: u32,
}

impl NodeSet {
    pub fn new(nodes: u32, devices_per_node: u16) -> Self {
        let mut buckets = vec![Vec::new(); devices_per_node as usize + 1];
        buckets[devices_per_node as usize] = (0..nodes).collect();
        Self {
            devices_per_node,
            free: vec![devices_per_node; nodes as usize],
            pos: (0..nodes).collect(),
            buckets,
            free_devices: nodes as u64 * devices_per_node as u64,
            down: vec![false; nodes as usize],
            down_nodes: 0,
        }
    }

    /// Whether a node is out of service.
    pub fn is_down(&self, node: u32) -> bool {
        self.down[node as usize]
    }

    /// Devices on nodes out of service: neither free nor allocated.
    pub fn down_devices(&self) -> u64 {
        self.down_nodes as u64 * self.devices_per_node as u64
    }

    /// Takes a node out of service. The caller has ended the leases on it: it is wholly free.
    pub fn set_down(&mut self, node: u32) {
        debug_assert_eq!(self.free[node as usize], self.devices_per_node);
        self.set_free(node, 0);
        self.down[node as usize] = true;
        self.down_nodes += 1;
    }

    /// Brings a node back into service, wholly free.
    pub fn set_up(&mut self, node: u32) {
        self.set_free(node, self.devices_per_node);
        self.down[node as usize] = false;
        self.down_nodes -= 1;
    }

    pub fn devices_per_node(&self) -> u16 {
        self.devices_per_node
    }

    pub fn nodes(&self) -> u32 {
        self.free.len() as u32
    }

    pub fn capacity(&self) -> u64 {
        self.free.len() as u64 * self.devices_per_node as u64
    }

    pub fn free_devices(&self) -> u64 {
        self.free_devices
    }

    #[cfg(test)]
    pub fn free_on(&self, node: u32) -> u16 {
        self.free[node as usize]
    }

    /// Most free devices on any one node.
    pub fn max_node_free(&self) -> u16 {
        (0..=self.devices_per_node)
            .rev()
            .find(|&f| !self.buckets[f as usize].is_empty())
            .unwrap_or(0)
    }

    /// Nodes with exactly `m` free devices.
    pub fn nodes_with_exactly(&self, m: u16) -> u32 {
        self.buckets.get(m as usize).map_or(0, |b| b.len() as u32)
    }

    /// Nodes with at least `m` free devices.
    pub fn nodes_with_at_least(&self, m: u16) -> u32 {
        if m > self.devices_per_node {
            return 0;
        }
        self.buckets[m as usize..]
            .iter()
            .map(|b| b.len() as u32)
            .sum()
    }

    fn set_free(&mut self, node: u32, new_free: u16) {
        let old = self.free[node as usize];
        let bucket = &mut self.buckets[old as usize];
        let at = self.pos[node as usize] as usize;
        bucket.swap_remove(at);
        if let Some(&moved) = bucket.get(at) {
            self.pos[moved as usize] = at as u32;
        }
        let bucket = &mut self.buckets[new_free as usize];
        self.pos[node as usize] = bucket.len() as u32;
        bucket.push(node);
        self.free[node as usize] = new_free;
        self.free_devices = self.free_devices - old as u64 + new_free as u64;
    }

    /// Takes `m` devices on each of `n` nodes, tightest nodes first. The caller has checked
    /// `nodes_with_at_least(m) >= n`.
    pub fn take_gang(&mut self, group: u32, n: u32, m: u16, out: &mut Vec<Slice>) {
        let mut left = n;
        let mut f = m;
        while left > 0 && f <= self.devices_per_node {
            while left > 0 {
                let Some(&node) = self.buckets[f as usize].last() else {
                    break;
                };
                self.set_free(node, f - m);
                out.push(Slice {
                    group,
                    node,
                    devices: m,
                });
                left -= 1;
            }
            f += 1;
        }
        debug_assert_eq!(left, 0, "take_gang called without room");
    }

    /// Takes `d` devices anywhere, filling the fullest nodes first so whole nodes stay free for
    /// gangs. The caller has checked `free_devices() >= d`.
    pub fn take_devices(&mut self, group: u32, d: u64, out: &mut Vec<Slice>) {
        let mut left = d;
        let mut f = 1;
        while left > 0 && f <= self.devices_per_node {
            while left > 0 {
                let Some(&node) = self.buckets[f as usize].last() else {
                    break;
                };
                let take = (f as u64).min(left) as u16;
                self.set_free(node, f - take);
                out.push(Slice {
                    group,
                    node,
                    devices: take,
                });
                left -= take as u64;
            }
            f += 1;
        }
        debug_assert_eq!(left, 0, "take_devices called without room");
    }

    /// Returns devices of a slice. Never lets a node exceed its size.
    pub fn give(&mut self, node: u32, devices: u16) {
        let now = self.free[node as usize];
        let after = (now + devices).min(self.devices_per_node);
        debug_assert_eq!(
            now + devices,
            after,
            "a node was given back more than it had"
        );
        self.set_free(node, after);
    }

    /// Adds `extra` fully free nodes.
    pub fn grow(&mut self, extra: u32) {
        for _ in 0..extra {
            let node = self.free.len() as u32;
            let bucket = &mut self.buckets[self.devices_per_node as usize];
            self.pos.push(bucket.len() as u32);
            bucket.push(node);
            self.free.push(self.devices_per_node);
            self.down.push(false);
            self.free_devices += self.devices_per_node as u64;
        }
    }

    /// Removes the last `fewer` nodes if they are all fully free; otherwise changes nothing
    /// and returns false.
    pub fn shrink(&mut self, fewer: u32) -> bool {
        let keep = self.free.len().saturating_sub(fewer as usize);
        if self.free[keep..]
            .iter()
            .any(|&f| f != self.devices_per_node)
        {
            return false;
        }
        for node in (keep..self.free.len()).rev() {
            // Moving a node to the bucket it is in re-files it; then drop it from the top.
            let bucket = &mut self.buckets[self.devices_per_node as usize];
            let at = self.pos[node] as usize;
            bucket.swap_remove(at);
            if let Some(&moved) = bucket.get(at) {
                self.pos[moved as usize] = at as u32;
            }
            self.free.pop();
            self.down.pop();
            self.pos.pop();
            self.free_devices -= self.devices_per_node as u64;
        }
        true
    }

    /// Free devices of every node, for scratch simulations (shadow times, preemption).
    pub fn free_per_node(&self) -> &[u16] {
        &self.free
    }

    /// Which nodes are out of service, for audits.
    pub(crate) fn down(&self) -> &[bool] {
        &self.down
    }

    /// The nodes filed under each free count, for audits.
    pub(crate) fn buckets(&self) -> &[Vec<u32>] {
        &self.buckets
    }

    /// Where each node sits in its bucket, for audits.
    pub(crate) fn positions(&self) -> &[u32] {
        &self.pos
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gang_takes_tightest_nodes_first() {
        let mut s = NodeSet::new(4, 8);
        let mut out = Vec::new();
        s.take_devices(0, 6, &mut out); // one node left with 2 free
        assert_eq!(s.nodes_with_at_least(2), 4);
        out.clear();
        s.take_gang(0, 1, 2, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(s.free_on(out[0].node), 0, "the partly used node was chosen");
        assert_eq!(s.nodes_with_at_least(8), 3);
        assert_eq!(s.free_devices(), 24);
    }

    #[test]
    fn devices_fill_partial_nodes_before_whole_ones() {
        let mut s = NodeSet::new(3, 8);
        let mut out = Vec::new();
        s.take_devices(0, 3, &mut out);
        out.clear();
        s.take_devices(0, 5, &mut out);
        assert_eq!(out.len(), 1, "the 5 devices fit on the started node");
        assert_eq!(s.nodes_with_at_least(8), 2);
        assert_eq!(s.max_node_free(), 8);
    }

    #[test]
    fn give_restores_and_shrink_only_removes_free_nodes() {
        let mut s = NodeSet::new(2, 4);
        let mut out = Vec::new();
        s.take_gang(0, 2, 4, &mut out);
        assert_eq!(s.free_devices(), 0);
        assert!(!s.shrink(1));
        for sl in &out {
            s.give(sl.node, sl.devices);
        }
        assert_eq!(s.free_devices(), 8);
        assert!(s.shrink(1));
        assert_eq!(s.nodes(), 1);
        s.grow(2);
        assert_eq!(s.nodes_with_at_least(4), 3);
        assert_eq!(s.capacity(), 12);
    }

    #[test]
    fn a_node_out_of_service_offers_nothing_until_it_is_back() {
        let mut s = NodeSet::new(2, 8);
        s.set_down(0);
        assert!(s.is_down(0));
        assert_eq!(s.free_devices(), 8);
        assert_eq!(s.down_devices(), 8);
        assert_eq!(s.nodes_with_at_least(1), 1);
        let mut out = Vec::new();
        s.take_devices(0, 8, &mut out);
        assert!(
            out.iter().all(|sl| sl.node == 1),
            "nothing on the down node"
        );
        assert!(!s.shrink(1), "the last node is busy");
        s.set_up(0);
        assert_eq!(s.free_devices(), 8);
        assert_eq!(s.down_devices(), 0);
        assert_eq!(s.nodes_with_at_least(8), 1);
    }
}
