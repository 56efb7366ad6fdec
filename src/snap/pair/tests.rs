//! Model test of the pair engine's rules, without I/O: a simulated volume and copy
//! image (one token per track), the real [`Allocator`], [`ExtentMap`] and [`Pair`], and
//! a model that remembers each file's content at its split or update instant.
//!
//! Every step checks: a frozen copy reads exactly its instant's content (tracks whose
//! pending bit is set from the volume, the rest from the copy image); in the unfrozen
//! states every track whose forming-diff bit is clear mirrors the volume.

use super::*;
use crate::core::alloc::Allocator;
use crate::core::extent::ExtentMap;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

struct Sim {
    vol: Vec<u64>,
    copy: Vec<u64>,
    alloc: Allocator,
    files: [ExtentMap; 2],
    sizes: [u64; 2],
    pair: Option<Pair>,
    /// File 0's content (per file track) at the split/update instant.
    snapshot: Option<Vec<u64>>,
    next_token: u64,
    copies: u64,
    /// The bitmap rows as a metadata commit after every step would leave them.
    db: std::collections::BTreeMap<(u8, u64), Vec<u8>>,
}

const TRACKS: u64 = 64;

impl Sim {
    fn new() -> Sim {
        Sim {
            vol: vec![0; TRACKS as usize],
            copy: vec![0; TRACKS as usize],
            alloc: Allocator::new(TRACKS),
            files: [ExtentMap::new(), ExtentMap::new()],
            sizes: [0, 0],
            pair: None,
            snapshot: None,
            next_token: 1,
            copies: 0,
            db: std::collections::BTreeMap::new(),
        }
    }

    fn apply(&mut self, pins: Pins) {
        self.alloc.pin_set(&pins.pin);
        self.alloc.unpin_set(&pins.unpin);
        let h = self.alloc.take_held();
        self.alloc.release_held(&h);
    }

    fn content(&self, f: usize) -> Vec<u64> {
        (0..self.sizes[f])
            .map(|t| self.files[f].lookup(t).map_or(0, |v| self.vol[v as usize]))
            .collect()
    }

    fn frozen(&self) -> Vec<Frozen> {
        vec![Frozen {
            ino: 2,
            path: "f".into(),
            attr: FrozenAttr {
                kind: FrozenKind::File,
                perm: 0o644,
                uid: 0,
                gid: 0,
                size: self.sizes[0],
                atime: 0,
                mtime: 0,
                ctime: 0,
                rdev: 0,
            },
            extents: self.files[0].clone(),
            target: Vec::new(),
            ..Frozen::default()
        }]
    }

    fn copy_track(&mut self, v: u64) {
        self.copy[v as usize] = self.vol[v as usize];
        self.copies += 1;
    }

    fn write(&mut self, f: usize, t: u64) -> bool {
        let mut new = Vec::new();
        let v = match self.files[f].lookup(t) {
            Some(v) => v,
            None => match self.alloc.allocate(self.files[f].goal_for(t), 1) {
                Ok(r) => {
                    self.files[f].insert(t, r[0].0, 1);
                    new.push(r[0].0);
                    r[0].0
                }
                Err(_) => return false,
            },
        };
        let paired = f == 0 && self.pair.is_some();
        if paired {
            let p = self.pair.as_mut().unwrap();
            let need = p.cow_needed(&[v]);
            for &c in &need {
                self.copy[c as usize] = self.vol[c as usize];
                self.copies += 1;
            }
            self.pair.as_mut().unwrap().copied(&need);
        }
        self.vol[v as usize] = self.next_token;
        self.next_token += 1;
        if paired {
            self.pair.as_mut().unwrap().written(&[v]);
        }
        self.sizes[f] = self.sizes[f].max(t + 1);
        true
    }

    fn truncate(&mut self, f: usize, n: u64) {
        let freed: Vec<u64> = self.files[f]
            .remove(n, u64::MAX - n)
            .into_iter()
            .flat_map(|(v, l)| v..v + l)
            .collect();
        for &v in &freed {
            self.alloc.free(v, 1);
        }
        let h = self.alloc.take_held();
        self.alloc.release_held(&h);
        if f == 0
            && let Some(p) = self.pair.as_mut()
        {
            p.freed(&freed);
        }
        self.sizes[f] = self.sizes[f].min(n);
    }

    fn copier_step(&mut self, n: usize) {
        let Some(p) = self.pair.as_mut() else { return };
        let Some(pending) = p.pending() else { return };
        let batch = pending.next_batch(0, n);
        if p.state.is_frozen() {
            for &v in &batch {
                self.copy_track(v);
            }
            self.pair.as_mut().unwrap().copied(&batch);
        } else {
            p.copied(&batch);
            for &v in &batch {
                self.copy_track(v);
            }
        }
    }

    /// Commits the dirty chunks into `db` and checks that the rows reload to exactly
    /// the in-memory bitmaps (no chunk that changed was left out).
    fn check_persisted(&mut self, seed: u64, step: usize) {
        let Some(p) = self.pair.as_mut() else {
            self.db.clear();
            return;
        };
        for (w, ci, bytes) in crate::meta::take_dirty_chunks(p) {
            match bytes {
                Some(b) => self.db.insert((w, ci), b),
                None => self.db.remove(&(w, ci)),
            };
        }
        let mut sets = [TrackSet::new(), TrackSet::new(), TrackSet::new()];
        for ((w, ci), b) in &self.db {
            sets[*w as usize].load_chunk(*ci, b).unwrap();
        }
        let v = |t: &TrackSet| t.iter().collect::<Vec<_>>();
        assert_eq!(
            v(&sets[0]),
            v(&p.forming),
            "seed {seed} step {step}: persisted forming-diff"
        );
        assert_eq!(
            v(&sets[1]),
            v(&p.split_diff),
            "seed {seed} step {step}: persisted split-diff"
        );
        assert_eq!(
            v(&sets[2]),
            v(&p.update_diff),
            "seed {seed} step {step}: persisted update-diff"
        );
    }

    fn check(&self, seed: u64, step: usize) {
        let Some(p) = &self.pair else { return };
        if p.state.is_frozen() {
            let snap = self.snapshot.as_ref().expect("frozen has a snapshot");
            let f = &p.frozen[0];
            assert_eq!(
                f.attr.size,
                snap.len() as u64,
                "seed {seed} step {step}: frozen size"
            );
            for (t, want) in snap.iter().enumerate() {
                let got = match f.extents.lookup(t as u64) {
                    None => 0,
                    Some(v) if p.read_from_volume(v) => self.vol[v as usize],
                    Some(v) => self.copy[v as usize],
                };
                assert_eq!(
                    got, *want,
                    "seed {seed} step {step}: frozen track {t} ({:?})",
                    p.state
                );
            }
        } else if matches!(
            p.state,
            PairState::Forming | PairState::Formed | PairState::Resyncing
        ) {
            for v in self.files[0].vol_tracks() {
                if !p.forming.contains(v) {
                    assert_eq!(
                        self.copy[v as usize], self.vol[v as usize],
                        "seed {seed} step {step}: track {v} clear in forming-diff but stale"
                    );
                }
            }
        }
        if p.state == PairState::Split {
            // Every track changed since the instant (or new since) is in split-diff,
            // so an update will copy it.
            let snap = self.snapshot.as_ref().unwrap();
            for e in self.files[0].iter() {
                for k in 0..e.len {
                    let (t, v) = (e.file + k, e.vol + k);
                    let same_track = p.frozen[0].extents.lookup(t) == Some(v);
                    let unchanged = snap.get(t as usize) == Some(&self.vol[v as usize]);
                    if !(same_track && unchanged) {
                        assert!(
                            p.split_diff.contains(v),
                            "seed {seed} step {step}: changed track {v} missing from split-diff"
                        );
                    }
                }
            }
        }
    }

    fn step(&mut self, rng: &mut Rng, seed: u64, step: usize) {
        let now = step as i64;
        match rng.below(20) {
            0..=6 => {
                let f = if rng.below(4) == 0 { 1 } else { 0 };
                let t = rng.below(12);
                self.write(f, t);
            }
            7 => {
                let f = rng.below(2) as usize;
                let n = rng.below(self.sizes[f] + 1);
                self.truncate(f, n);
            }
            8..=11 => {
                let n = 1 + rng.below(4) as usize;
                self.copier_step(n);
            }
            12 => {
                if self.pair.is_none() {
                    let cur = self.files[0].vol_tracks().collect();
                    self.pair = Some(Pair::new(1, Scope::File(2), "/f".into(), cur, now));
                }
            }
            13 | 14 => {
                if self.pair.is_none() {
                    let cur = self.files[0].vol_tracks().collect();
                    self.pair = Some(Pair::new(1, Scope::File(2), "/f".into(), cur, now));
                }
                let frozen = self.frozen();
                let snap = self.content(0);
                let r = self.pair.as_mut().unwrap().split(frozen, now);
                if let Ok(pins) = r {
                    self.apply(pins);
                    self.snapshot = Some(snap);
                }
            }
            15 | 16 => {
                let frozen = vec![Sim::frozen_of(&self.files[0], self.sizes[0])];
                let snap = self.content(0);
                if let Some(p) = self.pair.as_mut()
                    && let Ok(pins) = p.update(frozen, now)
                {
                    self.apply(pins);
                    self.snapshot = Some(snap);
                }
            }
            17 => {
                let cur: TrackSet = self.files[0].vol_tracks().collect();
                if let Some(p) = self.pair.as_mut()
                    && let Ok(pins) = p.resync(&cur, now)
                {
                    self.apply(pins);
                    self.snapshot = None;
                }
            }
            18 => {
                if rng.below(4) == 0
                    && let Some(p) = self.pair.take()
                {
                    let pins = p.release();
                    self.apply(pins);
                    self.snapshot = None;
                }
            }
            _ => {
                // Drain the copier completely.
                for _ in 0..100 {
                    self.copier_step(8);
                }
            }
        }
        self.check(seed, step);
        self.check_persisted(seed, step);
    }

    fn frozen_of(m: &ExtentMap, size: u64) -> Frozen {
        Frozen {
            ino: 2,
            path: "f".into(),
            attr: FrozenAttr {
                kind: FrozenKind::File,
                perm: 0o644,
                uid: 0,
                gid: 0,
                size,
                atime: 0,
                mtime: 0,
                ctime: 0,
                rdev: 0,
            },
            extents: m.clone(),
            target: Vec::new(),
            ..Frozen::default()
        }
    }
}

#[test]
fn pair_engine_matches_the_model() {
    let base = std::env::var("PAIRFS_MODEL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x9e37_79b9_7f4a_7c15u64);
    let cases: u64 = std::env::var("PAIRFS_MODEL_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3000);
    println!(
        "pair model: base seed {base:#x}, {cases} cases (PAIRFS_MODEL_SEED / PAIRFS_MODEL_CASES)"
    );
    let mut copies = 0;
    let mut splits = 0;
    for c in 0..cases {
        let seed = base.wrapping_add(c.wrapping_mul(0x9E3779B97F4A7C15)) | 1;
        let mut rng = Rng(seed);
        let mut sim = Sim::new();
        for step in 0..200 {
            sim.step(&mut rng, seed, step);
        }
        copies += sim.copies;
        splits += sim.snapshot.is_some() as u64;
    }
    println!("pair model: {cases} cases x 200 steps, {copies} track copies, {splits} ended frozen");
    assert!(copies > 0 && splits > 0, "the model exercised nothing");
}

#[test]
fn update_copies_only_changed_tracks() {
    let mut s = Sim::new();
    for t in 0..10 {
        s.write(0, t);
    }
    let cur = s.files[0].vol_tracks().collect();
    s.pair = Some(Pair::new(1, Scope::File(2), "/f".into(), cur, 0));
    let frozen = s.frozen();
    let pins = s.pair.as_mut().unwrap().split(frozen, 1).unwrap();
    s.apply(pins);
    for _ in 0..10 {
        s.copier_step(16);
    }
    assert_eq!(s.pair.as_ref().unwrap().state, PairState::Split);
    s.write(0, 3);
    s.write(0, 7);
    let before = s.copies;
    let frozen = s.frozen();
    let pins = s.pair.as_mut().unwrap().update(frozen, 2).unwrap();
    s.apply(pins);
    assert_eq!(s.pair.as_ref().unwrap().progress.total, 2);
    for _ in 0..10 {
        s.copier_step(16);
    }
    assert_eq!(s.copies - before, 2);
    let p = s.pair.as_ref().unwrap();
    assert_eq!(p.state, PairState::Split);
    assert_eq!(p.progress.last_copied, 2);
}

#[test]
fn wrong_state_transitions_are_refused() {
    let mut p = Pair::new(
        1,
        Scope::File(2),
        "/f".into(),
        [5u64].into_iter().collect(),
        0,
    );
    assert!(matches!(p.update(vec![], 0), Err(Error::Busy(_))));
    p.copied(&[5]);
    assert_eq!(p.state, PairState::Formed);
    assert!(matches!(p.update(vec![], 0), Err(Error::Invalid(_))));
    assert!(matches!(
        p.resync(&TrackSet::new(), 0),
        Err(Error::Invalid(_))
    ));
    p.split(vec![], 0).unwrap();
    assert_eq!(p.state, PairState::Split);
    assert!(matches!(p.split(vec![], 0), Err(Error::Invalid(_))));
}

#[test]
fn retain_tracks_drops_bits_of_tracks_the_members_left_and_finishes_forming() {
    let set = |v: &[u64]| -> TrackSet { v.iter().copied().collect() };
    let mut p = Pair::new(1, Scope::Dir(2), "/d".into(), set(&[5, 6, 9]), 0);
    // Track 9 belonged to a file that left the scope.
    assert!(p.retain_tracks(&set(&[5, 6])));
    assert_eq!(p.forming.iter().collect::<Vec<_>>(), vec![5, 6]);
    assert!(!p.retain_tracks(&set(&[5, 6])), "nothing left to drop");
    // Everything left: forming finishes.
    assert!(p.retain_tracks(&TrackSet::new()));
    assert_eq!(p.state, PairState::Formed);
    // The record bitmap of a split pair is trimmed too.
    let mut p = Pair::new(3, Scope::Dir(2), "/d".into(), TrackSet::new(), 0);
    p.split(vec![], 1).unwrap();
    p.written(&[7, 8]);
    assert!(p.retain_tracks(&set(&[7])));
    assert_eq!(p.split_diff.iter().collect::<Vec<_>>(), vec![7]);
}

/// A lazy instant: the split keeps the forming-diff as pending and pins nothing of the
/// scope; a lazy freeze pins its object's tracks; `needs_freeze` and `holds` follow the
/// inode limit and the records; a freed track leaves the split-diff; a lazy update copies
/// the split-diff and drops (unpins) the old records; a lazy resync copies the
/// split-diff tracks the scope still maps.
#[test]
fn lazy_instants_freeze_on_demand() {
    let file = |ino: u64, tracks: &[(u64, u64)]| {
        let mut e = ExtentMap::new();
        for (k, &(v, l)) in tracks.iter().enumerate() {
            e.insert(k as u64 * 100, v, l);
        }
        Frozen {
            ino,
            path: format!("d/f{ino}"),
            attr: FrozenAttr {
                kind: FrozenKind::File,
                ..FrozenAttr::default()
            },
            extents: e,
            ..Frozen::default()
        }
    };
    let top = Frozen {
        ino: 2,
        path: "d".into(),
        ..Frozen::default()
    };
    let mut p = Pair::new(
        1,
        Scope::Dir(2),
        "/d".into(),
        [7u64].into_iter().collect(),
        0,
    );
    let pins = p.split_lazy(top.clone(), 50, 1).unwrap();
    assert!(pins.pin.is_empty() && pins.unpin.is_empty());
    assert_eq!(p.state, PairState::Splitting);
    assert_eq!(
        p.pending().unwrap().count(),
        1,
        "the forming-diff stays pending"
    );
    assert!(p.needs_freeze(10) && !p.needs_freeze(2) && !p.needs_freeze(50));
    assert!(p.holds(10) && p.holds(2) && !p.holds(50));
    let pin = p.lazy_freeze(file(10, &[(20, 2)]));
    assert_eq!(pin.iter().collect::<Vec<_>>(), [20, 21]);
    assert!(!p.needs_freeze(10) && p.holds(10));
    p.lazy_freeze(Frozen::absent(11));
    assert!(!p.needs_freeze(11) && !p.holds(11), "absent: not held");
    assert_eq!(p.pinned_tracks().count(), 2);
    assert_eq!(p.frozen_saved, 1, "the top is written with the split");
    p.copied(&[7]);
    assert_eq!(p.state, PairState::Split);
    p.written(&[30, 31, 40]);
    p.freed(&[40]);
    assert_eq!(p.split_diff.iter().collect::<Vec<_>>(), [30, 31]);
    let pins = p.update_lazy(top.clone(), 60, None, 2).unwrap();
    assert_eq!(pins.unpin.iter().collect::<Vec<_>>(), [20, 21]);
    assert_eq!(p.state, PairState::Updating);
    assert_eq!(p.pending().unwrap().iter().collect::<Vec<_>>(), [30, 31]);
    assert_eq!(p.frozen.len(), 1);
    assert!(p.needs_freeze(10) && p.needs_freeze(55));
    p.copied(&[30, 31]);
    assert_eq!(p.state, PairState::Split);
    p.written(&[33]);
    let current: TrackSet = [31u64, 33, 90].into_iter().collect();
    p.resync(&current, 3).unwrap();
    assert_eq!(p.forming.iter().collect::<Vec<_>>(), [33]);
    assert_eq!(p.lazy, None);
    assert!(!p.needs_freeze(10));
    // From error, a lazy update needs the scope's tracks.
    p.copied(&[33]);
    p.split_lazy(top.clone(), 70, 4).unwrap();
    p.fail("x".into());
    assert!(p.update_lazy(top.clone(), 80, None, 5).is_err());
    let all: TrackSet = [5u64, 6].into_iter().collect();
    p.update_lazy(top, 80, Some(&all), 5).unwrap();
    assert_eq!(p.pending().unwrap().count(), 2);
}
