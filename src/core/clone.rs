//! Writable clones by write redirection (seed 003): the pure parts.
//!
//! A clone is an ordinary regular file whose inode row carries a *backing reference*
//! ([`CloneRef`]): the pair and the main inode of the frozen file it was made from, and a
//! byte limit. Its `extents` rows are the seed's position map (clone track → redirected
//! volume track): a mapped track reads from the volume like any file's; an unmapped track
//! reads the frozen copy below the limit and zeros above it. The first write to an
//! unmapped track allocates a new track, fills it with the frozen bytes, lays the write
//! over them and only then maps it ([`backed_holes`] says which tracks need the fill).
//! A truncate lowers the limit ([`CloneRef::truncated`]), so bytes past a shrink read
//! zero after a later extension. `--detach` fills every remaining backed track and drops
//! the reference.
//!
//! [`Dependents`] is the bookkeeping of which clones depend on which pair's frozen copy:
//! update, resync and release of that pair are refused (EBUSY) while one does.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::core::extent::{ExtentMap, Segment};
use crate::snap::pair::PairId;

/// A clone's backing: the frozen file it reads its unwritten tracks from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloneRef {
    /// The pair whose frozen copy backs the clone.
    pub pair: PairId,
    /// The frozen file's main inode (its object in the pair's frozen copy).
    pub src: u64,
    /// Bytes below this offset, in unmapped tracks, read from the frozen file; above it
    /// they read zero. Starts at the frozen size; a truncate lowers it.
    pub limit: u64,
}

impl CloneRef {
    /// The reference after a truncate to `size` (the limit never grows again).
    pub fn truncated(self, size: u64) -> CloneRef {
        CloneRef {
            limit: self.limit.min(size),
            ..self
        }
    }

    /// Number of file tracks that may read from the backing.
    pub fn backed_tracks(&self, ts: u64) -> u64 {
        self.limit.div_ceil(ts)
    }
}

/// The tracks of `[f0, f0+n)` that are unmapped in `extents` and start below `limit`:
/// the ones a write must fill from the frozen copy before mapping them.
pub fn backed_holes(extents: &ExtentMap, limit: u64, ts: u64, f0: u64, n: u64) -> Vec<u64> {
    let end = (f0 + n).min(limit.div_ceil(ts));
    if f0 >= end {
        return Vec::new();
    }
    extents
        .segments(f0, end - f0)
        .into_iter()
        .filter(|s| s.vol.is_none())
        .flat_map(|s| s.file..s.file + s.len)
        .collect()
}

/// The byte ranges of a read of `[off, off+len)` that come from the backing: the parts of
/// the hole segments `segs` below `limit`, clipped to the read.
pub fn backed_ranges(segs: &[Segment], limit: u64, ts: u64, off: u64, len: u64) -> Vec<(u64, u64)> {
    let end = (off + len).min(limit);
    let mut out: Vec<(u64, u64)> = Vec::new();
    for s in segs.iter().filter(|s| s.vol.is_none()) {
        let a = (s.file * ts).max(off);
        let b = ((s.file + s.len) * ts).min(end);
        if a < b {
            match out.last_mut() {
                Some(last) if last.1 == a => last.1 = b,
                _ => out.push((a, b)),
            }
        }
    }
    out
}

/// Which clones depend on which pair's frozen copy (in memory; rebuilt at mount from the
/// inode rows that carry a [`CloneRef`]).
#[derive(Debug, Default)]
pub struct Dependents {
    by_pair: BTreeMap<PairId, BTreeSet<u64>>,
    of: HashMap<u64, PairId>,
}

impl Dependents {
    /// Clone `ino` depends on pair `pair`.
    pub fn add(&mut self, pair: PairId, ino: u64) {
        if let Some(old) = self.of.insert(ino, pair)
            && old != pair
            && let Some(s) = self.by_pair.get_mut(&old)
        {
            s.remove(&ino);
            if s.is_empty() {
                self.by_pair.remove(&old);
            }
        }
        self.by_pair.entry(pair).or_default().insert(ino);
    }

    /// Clone `ino` no longer depends on anything (detached or deleted).
    pub fn remove(&mut self, ino: u64) {
        if let Some(pair) = self.of.remove(&ino)
            && let Some(s) = self.by_pair.get_mut(&pair)
        {
            s.remove(&ino);
            if s.is_empty() {
                self.by_pair.remove(&pair);
            }
        }
    }

    /// The clones of pair `pair` (lowest inode first).
    pub fn of_pair(&self, pair: PairId) -> Vec<u64> {
        self.by_pair
            .get(&pair)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }

    /// The pair clone `ino` depends on.
    pub fn pair_of(&self, ino: u64) -> Option<PairId> {
        self.of.get(&ino).copied()
    }

    /// Every dependent clone: (inode, pair), by inode.
    pub fn all(&self) -> Vec<(u64, PairId)> {
        let mut v: Vec<(u64, PairId)> = self.of.iter().map(|(&i, &p)| (i, p)).collect();
        v.sort_unstable();
        v
    }

    /// Number of dependent clones.
    pub fn len(&self) -> usize {
        self.of.len()
    }

    /// True if no clone depends on any pair.
    pub fn is_empty(&self) -> bool {
        self.of.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backed_holes_stop_at_the_limit_and_skip_mapped_tracks() {
        let mut m = ExtentMap::new();
        m.insert(1, 100, 2); // tracks 1, 2 mapped
        // limit 4.5 tracks of 10 bytes: tracks 0..5 backed.
        assert_eq!(backed_holes(&m, 45, 10, 0, 8), vec![0, 3, 4]);
        assert_eq!(backed_holes(&m, 45, 10, 2, 1), Vec::<u64>::new());
        assert_eq!(backed_holes(&m, 0, 10, 0, 8), Vec::<u64>::new());
        assert_eq!(backed_holes(&m, 45, 10, 5, 3), Vec::<u64>::new());
    }

    #[test]
    fn backed_ranges_clip_to_read_and_limit() {
        let mut m = ExtentMap::new();
        m.insert(1, 100, 1);
        let segs = m.segments(0, 4);
        // Read 5..38, limit 33: hole 0 gives 5..10, hole 2..4 gives 20..33.
        assert_eq!(backed_ranges(&segs, 33, 10, 5, 33), vec![(5, 10), (20, 33)]);
        // Adjacent holes merge.
        let e = ExtentMap::new();
        assert_eq!(
            backed_ranges(&e.segments(0, 3), 100, 10, 0, 30),
            vec![(0, 30)]
        );
        assert!(backed_ranges(&segs, 0, 10, 0, 40).is_empty());
    }

    #[test]
    fn truncate_lowers_the_limit_for_good() {
        let r = CloneRef {
            pair: 1,
            src: 9,
            limit: 1000,
        };
        let r = r.truncated(300);
        assert_eq!(r.limit, 300);
        assert_eq!(r.truncated(5000).limit, 300);
        assert_eq!(r.backed_tracks(64), 5);
    }

    #[test]
    fn dependents_track_pairs_and_clones() {
        let mut d = Dependents::default();
        assert!(d.is_empty());
        d.add(1, 10);
        d.add(1, 11);
        d.add(2, 12);
        assert_eq!(d.of_pair(1), vec![10, 11]);
        assert_eq!(d.pair_of(12), Some(2));
        d.add(2, 11); // moves
        assert_eq!(d.of_pair(1), vec![10]);
        assert_eq!(d.of_pair(2), vec![11, 12]);
        d.remove(10);
        assert!(d.of_pair(1).is_empty());
        d.remove(10);
        assert_eq!(d.len(), 2);
        assert_eq!(d.all(), vec![(11, 2), (12, 2)]);
    }
}
