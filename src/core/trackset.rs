//! A sparse set of track numbers: one bit per track, in 4096-bit chunks (`bitvec`).
//!
//! Pair bitmaps (forming-diff, split-diff, update-diff) are `TrackSet`s indexed by
//! *volume* track. A 1 TiB volume with 64 KiB tracks has 16 Mi tracks, but a pair only
//! covers the tracks of its files, so only the chunks that hold a set bit exist. Every
//! chunk remembers whether it changed since it was last persisted, so the metadata store
//! writes only changed chunks (512 bytes each).

use std::collections::{BTreeMap, BTreeSet};

use bitvec::prelude::*;

/// Bits per chunk.
pub const CHUNK_BITS: u64 = 4096;

type Chunk = BitArr!(for 4096, in u64, Lsb0);

/// A sparse bitmap of tracks.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TrackSet {
    chunks: BTreeMap<u64, Chunk>,
    count: u64,
    dirty: BTreeSet<u64>,
}

impl std::fmt::Debug for TrackSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.iter().take(64)).finish()
    }
}

impl TrackSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// True if no bit is set.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Tests one track.
    pub fn contains(&self, t: u64) -> bool {
        self.chunks
            .get(&(t / CHUNK_BITS))
            .is_some_and(|c| c[(t % CHUNK_BITS) as usize])
    }

    /// Sets one track; returns true if it was clear.
    pub fn insert(&mut self, t: u64) -> bool {
        let ci = t / CHUNK_BITS;
        let c = self.chunks.entry(ci).or_insert_with(|| BitArray::ZERO);
        let i = (t % CHUNK_BITS) as usize;
        if c[i] {
            return false;
        }
        c.set(i, true);
        self.count += 1;
        self.dirty.insert(ci);
        true
    }

    /// Sets `len` tracks from `start`, a chunk at a time.
    pub fn insert_range(&mut self, start: u64, len: u64) {
        let end = start.saturating_add(len);
        let mut t = start;
        while t < end {
            let ci = t / CHUNK_BITS;
            let a = (t % CHUNK_BITS) as usize;
            let b = ((end - ci * CHUNK_BITS).min(CHUNK_BITS)) as usize;
            let c = self.chunks.entry(ci).or_insert_with(|| BitArray::ZERO);
            let before = c.count_ones() as u64;
            c[a..b].fill(true);
            self.count += c.count_ones() as u64 - before;
            self.dirty.insert(ci);
            t = (ci + 1) * CHUNK_BITS;
        }
    }

    /// Sets every volume track an extent map maps.
    pub fn insert_extents(&mut self, m: &crate::core::extent::ExtentMap) {
        for e in m.iter() {
            self.insert_range(e.vol, e.len);
        }
    }

    fn combine(
        &self,
        other: &TrackSet,
        op: impl Fn(u64, u64) -> u64,
        keep_missing: bool,
    ) -> TrackSet {
        let mut out = TrackSet::new();
        let zero: Chunk = BitArray::ZERO;
        let keys: BTreeSet<u64> = if keep_missing {
            self.chunks
                .keys()
                .chain(other.chunks.keys())
                .copied()
                .collect()
        } else {
            self.chunks.keys().copied().collect()
        };
        for ci in keys {
            let a = self.chunks.get(&ci).unwrap_or(&zero);
            let b = other.chunks.get(&ci).unwrap_or(&zero);
            let mut c: Chunk = BitArray::ZERO;
            for ((w, x), y) in c
                .as_raw_mut_slice()
                .iter_mut()
                .zip(a.as_raw_slice())
                .zip(b.as_raw_slice())
            {
                *w = op(*x, *y);
            }
            let n = c.count_ones() as u64;
            if n > 0 {
                out.chunks.insert(ci, c);
                out.count += n;
                out.dirty.insert(ci);
            }
        }
        out
    }

    /// Bits set in both.
    pub fn intersection(&self, other: &TrackSet) -> TrackSet {
        self.combine(other, |a, b| a & b, false)
    }

    /// Bits set in `self` but not in `other`.
    pub fn difference(&self, other: &TrackSet) -> TrackSet {
        self.combine(other, |a, b| a & !b, false)
    }

    /// Bits set in either.
    pub fn union(&self, other: &TrackSet) -> TrackSet {
        self.combine(other, |a, b| a | b, true)
    }

    /// Replaces the content with `other`'s, marking every chunk that changed (or
    /// vanished) dirty so it is persisted.
    pub fn assign(&mut self, other: TrackSet) {
        let old: Vec<u64> = self.chunks.keys().copied().collect();
        self.dirty.extend(old);
        self.dirty.extend(other.chunks.keys().copied());
        self.chunks = other.chunks;
        self.count = other.count;
    }

    /// Clears one track; returns true if it was set.
    pub fn remove(&mut self, t: u64) -> bool {
        let ci = t / CHUNK_BITS;
        let Some(c) = self.chunks.get_mut(&ci) else {
            return false;
        };
        let i = (t % CHUNK_BITS) as usize;
        if !c[i] {
            return false;
        }
        c.set(i, false);
        self.count -= 1;
        self.dirty.insert(ci);
        if c.not_any() {
            self.chunks.remove(&ci);
        }
        true
    }

    /// Clears every bit.
    pub fn clear(&mut self) {
        let keys: Vec<u64> = self.chunks.keys().copied().collect();
        self.dirty.extend(keys);
        self.chunks.clear();
        self.count = 0;
    }

    /// Set bits in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.chunks
            .iter()
            .flat_map(|(ci, c)| c.iter_ones().map(move |i| ci * CHUNK_BITS + i as u64))
    }

    /// Up to `max` set bits at or after `from`, in order.
    pub fn next_batch(&self, from: u64, max: usize) -> Vec<u64> {
        let mut out = Vec::new();
        for (ci, c) in self.chunks.range(from / CHUNK_BITS..) {
            for i in c.iter_ones() {
                let t = ci * CHUNK_BITS + i as u64;
                if t >= from {
                    out.push(t);
                    if out.len() >= max {
                        return out;
                    }
                }
            }
        }
        out
    }

    /// Adds every bit of `other`.
    pub fn union_with(&mut self, other: &TrackSet) {
        for t in other.iter() {
            self.insert(t);
        }
    }

    /// The set as raw 64-bit words: (index of the chunk's first word, 64 words), where
    /// bit `b` of word `w` is track `w * 64 + b`.
    pub fn words(&self) -> impl Iterator<Item = (u64, &[u64])> + '_ {
        self.chunks
            .iter()
            .map(|(ci, c)| (ci * (CHUNK_BITS / 64), c.as_raw_slice()))
    }

    /// Chunks changed since the last [`TrackSet::take_dirty`]: (chunk index, bytes or
    /// `None` if the chunk is now empty and its row should be deleted).
    pub fn take_dirty(&mut self) -> Vec<(u64, Option<Vec<u8>>)> {
        let dirty = std::mem::take(&mut self.dirty);
        dirty
            .into_iter()
            .map(|ci| (ci, self.chunks.get(&ci).map(chunk_bytes)))
            .collect()
    }

    /// Marks every chunk as changed (for a full rewrite).
    pub fn mark_all_dirty(&mut self) {
        let keys: Vec<u64> = self.chunks.keys().copied().collect();
        self.dirty.extend(keys);
    }

    /// Loads one persisted chunk. Refuses a blob of the wrong size.
    pub fn load_chunk(&mut self, ci: u64, bytes: &[u8]) -> Result<(), String> {
        if bytes.len() != (CHUNK_BITS / 8) as usize {
            return Err(format!(
                "bitmap chunk {ci} has {} bytes, expected {}",
                bytes.len(),
                CHUNK_BITS / 8
            ));
        }
        let mut c: Chunk = BitArray::ZERO;
        for (w, b) in c.as_raw_mut_slice().iter_mut().zip(bytes.chunks_exact(8)) {
            *w = u64::from_le_bytes(b.try_into().expect("8 bytes"));
        }
        let n = c.count_ones() as u64;
        if let Some(old) = self.chunks.insert(ci, c) {
            self.count -= old.count_ones() as u64;
        }
        self.count += n;
        if n == 0 {
            self.chunks.remove(&ci);
        }
        Ok(())
    }
}

fn chunk_bytes(c: &Chunk) -> Vec<u8> {
    c.as_raw_slice()
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect()
}

impl FromIterator<u64> for TrackSet {
    fn from_iter<I: IntoIterator<Item = u64>>(iter: I) -> Self {
        let mut s = TrackSet::new();
        for t in iter {
            s.insert(t);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn behaves_like_a_btreeset(ops in proptest::collection::vec((0u8..3, 0u64..20_000), 0..400)) {
            let mut s = TrackSet::new();
            let mut m = BTreeSet::new();
            for (op, t) in ops {
                match op {
                    0 => prop_assert_eq!(s.insert(t), m.insert(t)),
                    1 => prop_assert_eq!(s.remove(t), m.remove(&t)),
                    _ => prop_assert_eq!(s.contains(t), m.contains(&t)),
                }
            }
            prop_assert_eq!(s.count(), m.len() as u64);
            prop_assert_eq!(s.iter().collect::<Vec<_>>(), m.iter().copied().collect::<Vec<_>>());
            // Round trip through persisted chunks.
            let mut copy = TrackSet::new();
            s.mark_all_dirty();
            for (ci, bytes) in s.take_dirty() {
                if let Some(b) = bytes { copy.load_chunk(ci, &b).unwrap(); }
            }
            prop_assert_eq!(copy.iter().collect::<Vec<_>>(), m.iter().copied().collect::<Vec<_>>());
            prop_assert_eq!(copy.count(), m.len() as u64);
        }
    }

    proptest! {
        #[test]
        fn set_operations_match_btreesets(
            a in proptest::collection::vec(0u64..12_000, 0..200),
            b in proptest::collection::vec(0u64..12_000, 0..200),
            r in (0u64..12_000, 0u64..9_000),
        ) {
            let (sa, sb): (TrackSet, TrackSet) = (a.iter().copied().collect(), b.iter().copied().collect());
            let (ma, mb): (BTreeSet<u64>, BTreeSet<u64>) = (a.into_iter().collect(), b.into_iter().collect());
            let v = |s: &TrackSet| s.iter().collect::<Vec<_>>();
            prop_assert_eq!(v(&sa.intersection(&sb)), ma.intersection(&mb).copied().collect::<Vec<_>>());
            prop_assert_eq!(v(&sa.difference(&sb)), ma.difference(&mb).copied().collect::<Vec<_>>());
            prop_assert_eq!(v(&sa.union(&sb)), ma.union(&mb).copied().collect::<Vec<_>>());
            prop_assert_eq!(sa.union(&sb).count(), ma.union(&mb).count() as u64);
            let mut x = sa.clone();
            x.insert_range(r.0, r.1);
            let mut mx = ma.clone();
            mx.extend(r.0..r.0 + r.1);
            prop_assert_eq!(v(&x), mx.iter().copied().collect::<Vec<_>>());
            prop_assert_eq!(x.count(), mx.len() as u64);
            let mut y = sb.clone();
            y.assign(sa.clone());
            prop_assert_eq!(v(&y), v(&sa));
        }
    }

    #[test]
    fn next_batch_and_bad_chunk() {
        let s: TrackSet = [5u64, 9, 5000, 9000].into_iter().collect();
        assert_eq!(s.next_batch(6, 2), vec![9, 5000]);
        assert_eq!(s.next_batch(9001, 2), Vec::<u64>::new());
        let mut t = TrackSet::new();
        assert!(t.load_chunk(0, &[1, 2, 3]).is_err());
    }
}
