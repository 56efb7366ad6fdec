//! Staged copy-on-write: host writes held in memory until the old tracks are durable
//! on the copy image (seed 000's copy through cache).
//!
//! A host write to a track whose pending bit is set (the frozen copy still needs the
//! volume's old data there) does not wait for the copy, and does not copy anything
//! itself: its bytes are kept here as a *patch* of that track, and the write is
//! acknowledged at once. The volume keeps the old track meanwhile, so reads of the
//! live file lay the patches over what they read from the volume, and the frozen copy
//! and the copier still find the split-time data there. The destager
//! ([`crate::snap::engine::Engine::destage`]) then, per pair: copies the old tracks
//! that still need it to the copy image, syncs it, clears the pending bits and commits
//! them, and only then writes each track's patches to the volume, in order, and drops
//! them. So the order of `docs/design.md` holds: the old track is durable on the copy
//! and its bit cleared durably before the new data reaches the volume.
//!
//! This module is the container only (no I/O, no pair logic): patches by volume track,
//! the tracks awaiting a destage round per pair, and the byte count that bounds it.

use std::collections::{BTreeMap, HashMap};

use crate::snap::pair::PairId;

/// One staged track: the patches written to it since it was staged, oldest first.
#[derive(Debug, Clone)]
pub struct Staged {
    /// The pair whose copy-on-write the track waits for.
    pub pair: PairId,
    /// `(offset in the track, bytes)`, oldest first; a later patch wins where they
    /// overlap.
    pub patches: Vec<(u64, Box<[u8]>)>,
}

impl Staged {
    fn bytes(&self) -> u64 {
        self.patches.iter().map(|(_, d)| d.len() as u64).sum()
    }

    /// Lays the patches over `buf`, which holds the track's bytes `[off, off+len)`.
    pub fn overlay(&self, off: u64, buf: &mut [u8]) {
        let end = off + buf.len() as u64;
        for (p, d) in &self.patches {
            let (a, b) = ((*p).max(off), (p + d.len() as u64).min(end));
            if a < b {
                buf[(a - off) as usize..(b - off) as usize]
                    .copy_from_slice(&d[(a - p) as usize..(b - p) as usize]);
            }
        }
    }
}

/// Staged tracks, by volume track.
#[derive(Debug, Default)]
pub struct StageTable {
    entries: HashMap<u64, Staged>,
    waiting: BTreeMap<PairId, Vec<u64>>,
    bytes: u64,
}

impl StageTable {
    /// Number of staged tracks.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True if nothing is staged.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// True if `track` is staged.
    pub fn contains(&self, track: u64) -> bool {
        self.entries.contains_key(&track)
    }

    /// Adds `data` at `off` to the staged track; false if it is not staged. Earlier
    /// patches the new one covers whole are dropped (repeated writes of the same range
    /// do not grow the table).
    pub fn patch(&mut self, track: u64, off: u64, data: &[u8]) -> bool {
        let Some(e) = self.entries.get_mut(&track) else {
            return false;
        };
        let end = off + data.len() as u64;
        let before = e.bytes();
        e.patches
            .retain(|(p, d)| !(*p >= off && p + d.len() as u64 <= end));
        e.patches.push((off, data.into()));
        self.bytes = self.bytes - before + e.bytes();
        true
    }

    /// Stages `track` for pair `pair` with its first patch. The caller has made sure it
    /// is not staged yet.
    pub fn insert(&mut self, track: u64, pair: PairId, off: u64, data: &[u8]) {
        let e = Staged {
            pair,
            patches: vec![(off, data.into())],
        };
        self.bytes += e.bytes();
        self.waiting.entry(pair).or_default().push(track);
        if let Some(old) = self.entries.insert(track, e) {
            // Not expected; keep the count right if it happens.
            self.bytes -= old.bytes();
        }
    }

    /// The staged track, if any.
    pub fn get(&self, track: u64) -> Option<&Staged> {
        self.entries.get(&track)
    }

    /// True if some pair has tracks waiting for a destage round.
    pub fn has_waiting(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// Takes the lists of tracks waiting for a destage round, by pair.
    pub fn take_waiting(&mut self) -> BTreeMap<PairId, Vec<u64>> {
        std::mem::take(&mut self.waiting)
    }

    /// Removes a staged track (after its patches reached the volume, or it was freed).
    pub fn remove(&mut self, track: u64) -> Option<Staged> {
        let e = self.entries.remove(&track)?;
        self.bytes -= e.bytes();
        Some(e)
    }

    /// Puts tracks back on a pair's waiting list (a destage round failed for them).
    pub fn wait_again(&mut self, pair: PairId, tracks: Vec<u64>) {
        let tracks: Vec<u64> = tracks
            .into_iter()
            .filter(|t| self.entries.contains_key(t))
            .collect();
        if !tracks.is_empty() {
            self.waiting.entry(pair).or_default().extend(tracks);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn patch_overlay_remove_and_count() {
        let mut t = StageTable::default();
        assert!(!t.patch(5, 0, &[1]));
        t.insert(5, 1, 2, &[1, 2]);
        t.insert(9, 2, 0, &[7; 8]);
        assert_eq!(t.bytes(), 10);
        assert!(t.patch(5, 3, &[3, 4]));
        let mut b = [0u8; 6];
        t.get(5).unwrap().overlay(0, &mut b);
        assert_eq!(b, [0, 0, 1, 3, 4, 0]);
        // A patch covering an earlier one replaces it.
        assert!(t.patch(5, 2, &[9, 9, 9]));
        assert_eq!(t.get(5).unwrap().patches.len(), 1);
        assert_eq!(t.bytes(), 11);
        let w = t.take_waiting();
        assert_eq!(w.get(&1), Some(&vec![5]));
        assert_eq!(w.get(&2), Some(&vec![9]));
        assert!(t.take_waiting().is_empty());
        t.wait_again(1, vec![5, 77]);
        assert_eq!(t.take_waiting().get(&1), Some(&vec![5]));
        assert_eq!(t.remove(5).map(|e| e.pair), Some(1));
        assert_eq!(t.bytes(), 8);
        assert!(t.remove(5).is_none());
    }

    proptest! {
        /// Patches laid over a track, read back through any window, equal the same
        /// writes applied to a plain buffer; the byte count never exceeds what was
        /// written.
        #[test]
        fn overlay_matches_a_plain_buffer(
            writes in proptest::collection::vec((0u64..64, 1usize..24, any::<u8>()), 1..40),
            win in (0u64..64, 1usize..64),
        ) {
            let mut t = StageTable::default();
            let mut model = [0u8; 96];
            let mut written = 0u64;
            for (k, (off, len, v)) in writes.iter().enumerate() {
                let data = vec![v.wrapping_add(k as u8); *len];
                if !t.patch(3, *off, &data) {
                    t.insert(3, 1, *off, &data);
                }
                model[*off as usize..*off as usize + len].copy_from_slice(&data);
                written += *len as u64;
            }
            prop_assert!(t.bytes() <= written);
            let (o, l) = (win.0, win.1.min(96 - win.0 as usize));
            let mut buf = vec![0u8; l];
            t.get(3).unwrap().overlay(o, &mut buf);
            prop_assert_eq!(&buf[..], &model[o as usize..o as usize + l]);
        }
    }
}
