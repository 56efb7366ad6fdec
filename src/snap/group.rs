//! A file split on its own inside a group (seed 004, third embodiment): the pure rule
//! that keeps the group's frozen copy of the file and the file's own frozen copy apart
//! on the copy image.
//!
//! A frozen copy keeps volume track *v* at copy-image track *v*: one place per volume
//! track. When file F, a member of directory or root pair G whose frozen copy holds F,
//! gets a pair P of its own, G's record of F (frozen first, if G's lazy instant had not
//! yet) pins F's tracks, and G's copy of them is (or will be) at the same copy-image
//! tracks. P's copies (its copier, copy-on-write, and every later update) would write
//! there too, over G's instant. So before P takes F, every track of F that a frozen copy
//! pins is *moved*: a new track is allocated, the data copied on the volume, and F's
//! extent map points at the new track ([`plan_moves`], [`apply_moves`]). The old tracks
//! stay pinned by G's record (no live file maps them any more, so the volume keeps G's
//! instant there until G copies it); P owns only tracks no frozen copy holds. The two
//! frozen copies never share a volume track, hence never a copy-image track.

use crate::core::alloc::Allocator;
use crate::core::extent::{Extent, ExtentMap};
use crate::error::Result;

/// One run of a file to move: file tracks `file..file+len` from volume tracks
/// `from..` to `to..`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    /// First file track.
    pub file: u64,
    /// First volume track now (pinned by a frozen copy).
    pub from: u64,
    /// First new volume track.
    pub to: u64,
    /// Tracks.
    pub len: u64,
}

/// The maximal runs of `extents` whose volume tracks are `pinned`.
pub fn pinned_runs(extents: &ExtentMap, pinned: impl Fn(u64) -> bool) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    for e in extents.iter() {
        for k in 0..e.len {
            if !pinned(e.vol + k) {
                continue;
            }
            match out.last_mut() {
                Some(l) if l.file + l.len == e.file + k && l.vol + l.len == e.vol + k => l.len += 1,
                _ => out.push(Extent {
                    file: e.file + k,
                    vol: e.vol + k,
                    len: 1,
                }),
            }
        }
    }
    out
}

/// Allocates new tracks for every run of `extents` that `alloc` has pinned (a frozen
/// copy holds it), near the old ones. The
/// map is not changed: the caller copies the data of each move, then calls
/// [`apply_moves`] (or, if a copy failed, frees every `to` run). `NoSpace` if the
/// volume has not enough free tracks (nothing allocated then).
pub fn plan_moves(extents: &ExtentMap, alloc: &mut Allocator) -> Result<Vec<Move>> {
    let runs = pinned_runs(extents, |t| alloc.is_pinned(t));
    let need: u64 = runs.iter().map(|r| r.len).sum();
    if need > alloc.free_tracks() {
        return Err(crate::error::Error::NoSpace("volume"));
    }
    let mut out = Vec::new();
    for r in runs {
        let mut f = r.file;
        let mut from = r.vol;
        for (v, l) in alloc.allocate(Some(r.vol + r.len), r.len)? {
            out.push(Move {
                file: f,
                from,
                to: v,
                len: l,
            });
            f += l;
            from += l;
        }
    }
    Ok(out)
}

/// Points the moved file tracks of `extents` at their new tracks. Returns the old
/// runs (volume track, length), which the caller frees (they stay pinned).
pub fn apply_moves(extents: &mut ExtentMap, moves: &[Move]) -> Vec<(u64, u64)> {
    let mut old = Vec::new();
    for m in moves {
        old.extend(extents.remove(m.file, m.len));
        extents.insert(m.file, m.to, m.len);
    }
    old
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_pinned_tracks_move_and_runs_stay_whole() {
        let mut a = Allocator::new(64);
        let mut m = ExtentMap::new();
        for (f, v, l) in [(0, 10, 4), (4, 20, 2), (8, 30, 3)] {
            a.mark_used(v, l).unwrap();
            m.insert(f, v, l);
        }
        // Pinned: 11..13 and 20..21 (a run that crosses two extents stays split by
        // them), 30 alone.
        let pinned = |t: u64| matches!(t, 11 | 12 | 20 | 21 | 30);
        let runs = pinned_runs(&m, pinned);
        assert_eq!(
            runs,
            vec![
                Extent {
                    file: 1,
                    vol: 11,
                    len: 2
                },
                Extent {
                    file: 4,
                    vol: 20,
                    len: 2
                },
                Extent {
                    file: 8,
                    vol: 30,
                    len: 1
                },
            ]
        );
        for t in [11, 12, 20, 21, 30] {
            a.pin(t);
        }
        let moves = plan_moves(&m, &mut a).unwrap();
        assert_eq!(moves.iter().map(|m| m.len).sum::<u64>(), 5);
        let before = m.clone();
        let old = apply_moves(&mut m, &moves);
        let mut old_tracks: Vec<u64> = old.iter().flat_map(|&(v, l)| v..v + l).collect();
        old_tracks.sort();
        assert_eq!(old_tracks, vec![11, 12, 20, 21, 30]);
        for f in 0..11 {
            let (b, n) = (before.lookup(f), m.lookup(f));
            match b {
                Some(v) if pinned(v) => {
                    let n = n.unwrap();
                    assert!(!pinned(n) && n != v, "file track {f} moved off {v}");
                }
                _ => assert_eq!(b, n, "file track {f} kept"),
            }
        }
        // The new tracks are the allocator's: none of them is free any more.
        for mv in &moves {
            for t in mv.to..mv.to + mv.len {
                assert!(a.is_used(t));
            }
        }
    }

    #[test]
    fn no_space_allocates_nothing() {
        let mut a = Allocator::new(8);
        let mut m = ExtentMap::new();
        a.mark_used(1, 5).unwrap();
        m.insert(0, 1, 5);
        let free = a.free_tracks();
        for t in 1..6 {
            a.pin(t);
        }
        assert!(plan_moves(&m, &mut a).is_err());
        assert_eq!(a.free_tracks(), free);
    }
}
