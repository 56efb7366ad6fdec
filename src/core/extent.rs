//! Extent maps: which volume tracks hold which tracks of a file.
//!
//! A file's data is a sorted set of runs `file track f.. → volume track v..` of `len`
//! tracks. Unmapped file tracks are holes and read as zero. A volume track is mapped by
//! at most one file (the allocator guarantees it), which is what lets a pair bitmap be
//! indexed by volume track.

use std::collections::BTreeMap;

/// One run of an extent map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// First file track.
    pub file: u64,
    /// First volume track.
    pub vol: u64,
    /// Number of tracks.
    pub len: u64,
}

/// Piece of a file range: `vol` is `None` for a hole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// First file track of the piece.
    pub file: u64,
    /// First volume track, or None for a hole.
    pub vol: Option<u64>,
    /// Number of tracks.
    pub len: u64,
}

/// The extent map of one file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExtentMap {
    runs: BTreeMap<u64, (u64, u64)>,
    tracks: u64,
}

impl ExtentMap {
    /// An empty map (a file of holes).
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds a map from runs, refusing overlaps and zero-length runs.
    pub fn from_extents(exts: impl IntoIterator<Item = Extent>) -> Result<Self, String> {
        let mut m = ExtentMap::new();
        for e in exts {
            if e.len == 0 {
                return Err(format!("zero-length extent at file track {}", e.file));
            }
            if e.file.checked_add(e.len).is_none() || e.vol.checked_add(e.len).is_none() {
                return Err(format!("extent at file track {} overflows", e.file));
            }
            if m.segments(e.file, e.len).iter().any(|s| s.vol.is_some()) {
                return Err(format!("overlapping extent at file track {}", e.file));
            }
            m.insert(e.file, e.vol, e.len);
        }
        Ok(m)
    }

    /// Number of mapped tracks.
    pub fn tracks(&self) -> u64 {
        self.tracks
    }

    /// True if nothing is mapped.
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// The runs in file order.
    pub fn iter(&self) -> impl Iterator<Item = Extent> + '_ {
        self.runs
            .iter()
            .map(|(&file, &(vol, len))| Extent { file, vol, len })
    }

    /// Every mapped volume track.
    pub fn vol_tracks(&self) -> impl Iterator<Item = u64> + '_ {
        self.iter().flat_map(|e| e.vol..e.vol + e.len)
    }

    /// The volume track of file track `f`.
    pub fn lookup(&self, f: u64) -> Option<u64> {
        let (&start, &(vol, len)) = self.runs.range(..=f).next_back()?;
        (f < start + len).then(|| vol + (f - start))
    }

    /// Cuts `[f, f+n)` into mapped pieces and holes.
    pub fn segments(&self, f: u64, n: u64) -> Vec<Segment> {
        let mut out = Vec::new();
        let end = f + n;
        let mut pos = f;
        // A run that starts before f may cover it.
        let first = self.runs.range(..f).next_back().map(|(&s, &v)| (s, v));
        let iter = first
            .into_iter()
            .chain(self.runs.range(f..end).map(|(&s, &v)| (s, v)));
        for (s, (vol, len)) in iter {
            let rs = s.max(pos);
            let re = (s + len).min(end);
            if re <= rs {
                continue;
            }
            if rs > pos {
                out.push(Segment {
                    file: pos,
                    vol: None,
                    len: rs - pos,
                });
            }
            out.push(Segment {
                file: rs,
                vol: Some(vol + (rs - s)),
                len: re - rs,
            });
            pos = re;
        }
        if pos < end {
            out.push(Segment {
                file: pos,
                vol: None,
                len: end - pos,
            });
        }
        out
    }

    /// Maps `[f, f+len)` to `[v, v+len)`. The file range must be unmapped.
    pub fn insert(&mut self, f: u64, v: u64, len: u64) {
        debug_assert!(len > 0);
        debug_assert!(self.segments(f, len).iter().all(|s| s.vol.is_none()));
        let (mut f, mut v, mut len) = (f, v, len);
        // Merge with the run before.
        if let Some((&ps, &(pv, pl))) = self.runs.range(..f).next_back()
            && ps + pl == f
            && pv + pl == v
        {
            self.runs.remove(&ps);
            f = ps;
            v = pv;
            len += pl;
        }
        // Merge with the run after.
        if let Some(&(nv, nl)) = self.runs.get(&(f + len))
            && nv == v + len
        {
            self.runs.remove(&(f + len));
            len += nl;
        }
        self.runs.insert(f, (v, len));
        self.tracks = self.runs.values().map(|r| r.1).sum();
    }

    /// Unmaps `[f, f+n)`; returns the volume runs that were mapped there.
    pub fn remove(&mut self, f: u64, n: u64) -> Vec<(u64, u64)> {
        let end = f.saturating_add(n);
        let mut freed = Vec::new();
        let keys: Vec<u64> = self
            .runs
            .range(..end)
            .rev()
            .take_while(|(s, (_, l))| *s + *l > f)
            .map(|(s, _)| *s)
            .collect();
        for s in keys {
            let (vol, len) = self.runs.remove(&s).expect("key exists");
            let rs = s.max(f);
            let re = (s + len).min(end);
            if s < rs {
                self.runs.insert(s, (vol, rs - s));
            }
            if re < s + len {
                self.runs.insert(re, (vol + (re - s), s + len - re));
            }
            freed.push((vol + (rs - s), re - rs));
        }
        freed.reverse();
        self.tracks = self.runs.values().map(|r| r.1).sum();
        freed
    }

    /// Volume track that directly follows the file's last run (an allocation goal that
    /// keeps sequential writes contiguous).
    pub fn goal_for(&self, f: u64) -> Option<u64> {
        let (&s, &(vol, len)) = self.runs.range(..f).next_back()?;
        Some(vol + len + (f - (s + len)).min(64))
    }

    /// First mapped file track at or after `f`.
    pub fn next_data(&self, f: u64) -> Option<u64> {
        if self.lookup(f).is_some() {
            return Some(f);
        }
        self.runs.range(f..).next().map(|(&s, _)| s)
    }

    /// First unmapped file track at or after `f`.
    pub fn next_hole(&self, f: u64) -> u64 {
        let mut pos = f;
        while let Some((&s, &(_, len))) = self.runs.range(..=pos).next_back() {
            if pos < s + len {
                pos = s + len;
            } else {
                break;
            }
        }
        pos
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap as Model;

    #[test]
    fn merges_and_splits() {
        let mut m = ExtentMap::new();
        m.insert(0, 100, 4);
        m.insert(4, 104, 4);
        assert_eq!(m.iter().count(), 1);
        assert_eq!(m.remove(2, 2), vec![(102, 2)]);
        assert_eq!(m.iter().count(), 2);
        assert_eq!(m.lookup(5), Some(105));
        assert_eq!(m.lookup(2), None);
        assert_eq!(m.next_hole(0), 2);
        assert_eq!(m.next_data(2), Some(4));
        assert_eq!(m.tracks(), 6);
        assert!(
            ExtentMap::from_extents([
                Extent {
                    file: 0,
                    vol: 1,
                    len: 4
                },
                Extent {
                    file: 2,
                    vol: 9,
                    len: 1
                }
            ])
            .is_err()
        );
    }

    proptest! {
        #[test]
        fn matches_a_per_track_model(ops in proptest::collection::vec((any::<bool>(), 0u64..64, 1u64..9), 0..100)) {
            let mut m = ExtentMap::new();
            let mut model: Model<u64, u64> = Model::new();
            let mut next_vol = 1000;
            for (ins, f, n) in ops {
                if ins {
                    // Map every hole in [f, f+n) to fresh volume tracks.
                    for s in m.segments(f, n) {
                        if s.vol.is_none() {
                            m.insert(s.file, next_vol, s.len);
                            for i in 0..s.len { model.insert(s.file + i, next_vol + i); }
                            next_vol += s.len + 1;
                        }
                    }
                } else {
                    let freed: u64 = m.remove(f, n).iter().map(|r| r.1).sum();
                    let mut expect = 0;
                    for t in f..f + n { if model.remove(&t).is_some() { expect += 1; } }
                    prop_assert_eq!(freed, expect);
                }
                for t in 0..80 {
                    prop_assert_eq!(m.lookup(t), model.get(&t).copied());
                }
                prop_assert_eq!(m.tracks(), model.len() as u64);
                let segs = m.segments(0, 80);
                prop_assert_eq!(segs.iter().map(|s| s.len).sum::<u64>(), 80);
            }
        }
    }
}
