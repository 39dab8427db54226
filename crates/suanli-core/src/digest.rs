//! A stable 64-bit digest of engine state (FNV-1a), used to check that two engines that applied
//! the same commands are identical, across processes and across restarts. It must not depend on
//! the standard library's unspecified hasher, which may change between Rust releases.

use std::hash::Hasher;

pub(crate) struct Fnv64(u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv64 {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::Hash;

    #[test]
    fn known_vector() {
        let mut h = Fnv64::default();
        h.write(b"a");
        assert_eq!(h.finish(), 0xaf63_dc4c_8601_ec8c);
        let mut h2 = Fnv64::default();
        (1u32, "x").hash(&mut h2);
        let mut h3 = Fnv64::default();
        (1u32, "x").hash(&mut h3);
        assert_eq!(h2.finish(), h3.finish());
    }
}
