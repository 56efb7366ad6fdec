//! Staged copy-on-write: host writes held in memory until the old tracks are durable
//! on the copy image (seed 000's copy through cache).
//!
//! A host write to a track whose pending bit is set (the frozen copy still needs the
//! volume's old data there) does not wait for the copy. The writer reads the old track,
//! writes it to the copy image (not synced), and keeps the *new* content of the whole
//! track here, in a [`Staged`] entry. The write is acknowledged at once. Later writes to
//! the track patch the entry; reads see it. The destager
//! ([`crate::snap::engine::Engine::destage`]) then, per pair: syncs the copy image,
//! clears the pending bits and commits them, and only then writes each entry to the
//! volume and drops it. So the order of `docs/design.md` still holds: the old track is
//! durable on the copy and its bit cleared durably before the new data reaches the
//! volume.
//!
//! This module is the container only (no I/O, no pair logic): entries by volume track,
//! the tracks awaiting a destage round per pair, and the byte count that bounds it.

use std::collections::{BTreeMap, HashMap};

use crate::snap::pair::PairId;

/// One staged track: the full new content of volume track `track`.
#[derive(Debug)]
pub struct Staged {
    /// The pair whose copy-on-write the track waits for.
    pub pair: PairId,
    /// The track's new content (one track long).
    pub data: Box<[u8]>,
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

    /// Patches `data` at `off` into the staged track; false if it is not staged.
    pub fn patch(&mut self, track: u64, off: usize, data: &[u8]) -> bool {
        match self.entries.get_mut(&track) {
            Some(e) => {
                e.data[off..off + data.len()].copy_from_slice(data);
                true
            }
            None => false,
        }
    }

    /// Stages `track` with content `data` (the old track with the write applied) for
    /// pair `pair`. The caller has made sure it is not staged yet.
    pub fn insert(&mut self, track: u64, pair: PairId, data: Box<[u8]>) {
        self.bytes += data.len() as u64;
        self.waiting.entry(pair).or_default().push(track);
        if let Some(old) = self.entries.insert(track, Staged { pair, data }) {
            // Not expected; keep the count right if it happens.
            self.bytes -= old.data.len() as u64;
        }
    }

    /// The staged content of `track`.
    pub fn get(&self, track: u64) -> Option<&[u8]> {
        self.entries.get(&track).map(|e| &e.data[..])
    }

    /// True if some pair has tracks waiting for a destage round.
    pub fn has_waiting(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// Copies the staged part of `[off, off + buf.len())` of `track` into `buf`.
    /// Returns false if the track is not staged.
    pub fn read_into(&self, track: u64, off: usize, buf: &mut [u8]) -> bool {
        match self.entries.get(&track) {
            Some(e) => {
                buf.copy_from_slice(&e.data[off..off + buf.len()]);
                true
            }
            None => false,
        }
    }

    /// Takes the lists of tracks waiting for a destage round, by pair.
    pub fn take_waiting(&mut self) -> BTreeMap<PairId, Vec<u64>> {
        std::mem::take(&mut self.waiting)
    }

    /// Removes a staged track (after it reached the volume, or it was freed).
    pub fn remove(&mut self, track: u64) -> Option<Staged> {
        let e = self.entries.remove(&track)?;
        self.bytes -= e.data.len() as u64;
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

    /// Every staged track (for a full flush when a pair's list was lost).
    pub fn all_tracks(&self) -> Vec<u64> {
        self.entries.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_read_remove_and_count() {
        let mut t = StageTable::default();
        assert!(!t.patch(5, 0, &[1]));
        t.insert(5, 1, vec![0u8; 8].into_boxed_slice());
        t.insert(9, 2, vec![7u8; 8].into_boxed_slice());
        assert_eq!(t.bytes(), 16);
        assert!(t.patch(5, 2, &[1, 2]));
        let mut b = [0u8; 4];
        assert!(t.read_into(5, 1, &mut b));
        assert_eq!(b, [0, 1, 2, 0]);
        assert!(!t.read_into(6, 0, &mut b));
        let w = t.take_waiting();
        assert_eq!(w.get(&1), Some(&vec![5]));
        assert_eq!(w.get(&2), Some(&vec![9]));
        assert!(t.take_waiting().is_empty());
        t.wait_again(1, vec![5, 77]);
        assert_eq!(t.take_waiting().get(&1), Some(&vec![5]));
        assert_eq!(t.remove(5).map(|e| e.pair), Some(1));
        assert_eq!(t.bytes(), 8);
        assert_eq!(t.all_tracks(), vec![9]);
        assert!(t.remove(5).is_none());
    }
}
