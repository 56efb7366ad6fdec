//! Named generations of a pair (`setfattr -n user.pairfs.split -v NAME PATH`): the pure
//! bookkeeping. No I/O, no locks; the engine (`snap/engine/gens.rs`) drives it.
//!
//! A pair's default generation is its frozen copy on the copy image (the pair state
//! machine, [`crate::snap::pair`]). A *named* generation is a further instant of the same
//! scope kept by copy-on-write alone: its frozen records (a [`Pair`] in state `split`
//! holds them, lazily for directory and root scopes, exactly as a lazy pair does) name
//! volume tracks, and the instant's data of such a track stays on the volume until the
//! host first overwrites it; just before that the old track is *saved* into a slot: a
//! volume track allocated for it (so no file and no pair ever uses that address), whose
//! copy-image track receives the old data. Reads of a generation's track go to its slot
//! once saved, else to the volume (pinned, so not reused, and not overwritten unsaved).
//!
//! Space is shared: one save serves every generation that still needs the track at that
//! moment (they all froze the same bytes), so a slot is referenced by one or more
//! generations ([`Refs`]); a track never overwritten is stored nowhere but the volume.
//! Releasing a generation frees only the slots no other generation references, and
//! unpins only the tracks no other generation or pair pins.

use std::collections::HashMap;

use crate::core::trackset::TrackSet;
use crate::error::{Error, Result};
use crate::snap::pair::{Frozen, Pair, PairId};

/// Most named generations per pair.
pub const MAX_PER_PAIR: usize = 64;

/// The name that means the pair's own frozen copy (also: no value).
pub const DEFAULT_NAME: &str = "default";

/// Checks a generation name: 1 to 64 bytes of `A-Z a-z 0-9 . _ -`, starting with a
/// letter (so it is never taken for a pair id), not [`DEFAULT_NAME`].
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_alphabetic()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !ok {
        return Err(Error::invalid(format!(
            "generation name {name:?}: 1 to 64 characters of A-Z a-z 0-9 . _ -, starting \
             with a letter"
        )));
    }
    if name == DEFAULT_NAME {
        return Err(Error::invalid(
            "generation \"default\" is the pair's own frozen copy (split without a value)",
        ));
    }
    Ok(())
}

/// Tracks pinned by frozen records.
pub fn tracks_of(frozen: &[Frozen]) -> TrackSet {
    let mut s = TrackSet::new();
    for f in frozen {
        s.insert_extents(&f.extents);
    }
    s
}

/// The records of a generation's instant: a [`Pair`] value in state `split` (never
/// copied, never a member's pair) holding `frozen`, lazy below `lazy` if given.
pub fn instant(
    id: PairId,
    (scope, path): (crate::snap::pair::Scope, String),
    split_ns: i64,
    frozen: Vec<Frozen>,
    lazy: Option<u64>,
) -> Pair {
    let mut p = Pair::new(id, scope, path, TrackSet::new(), split_ns);
    p.state = crate::snap::pair::PairState::Split;
    p.split_ns = split_ns;
    p.set_frozen(frozen, lazy);
    p
}

/// One named generation.
#[derive(Debug, Clone)]
pub struct Gen {
    /// The pair whose scope it freezes.
    pub parent: PairId,
    /// Its name.
    pub name: String,
    /// The records (state `split`; `lazy` for directory and root scopes). Its id is
    /// the generation's.
    pub p: Pair,
    /// Volume tracks the records name (pinned in the allocator while this lives).
    pub pins: TrackSet,
    /// Saved tracks: volume track → slot. A save enters it only once its rows are
    /// committed (until then a reader reads the volume, which holds the same bytes).
    pub saved: HashMap<u64, u64>,
}

impl Gen {
    /// A generation of `parent` with records `p`.
    pub fn new(parent: PairId, name: String, p: Pair) -> Gen {
        let pins = tracks_of(&p.frozen);
        Gen {
            parent,
            name,
            p,
            pins,
            saved: HashMap::new(),
        }
    }

    /// True if a host write to volume track `t` must save it first for this generation.
    pub fn needs_save(&self, t: u64) -> bool {
        self.pins.contains(t) && !self.saved.contains_key(&t)
    }

    /// Adds a record frozen lazily (before its object's first change); returns the
    /// tracks to pin now.
    pub fn lazy_freeze(&mut self, f: Frozen) -> TrackSet {
        let pin = self.p.lazy_freeze(f);
        self.pins.union_with(&pin);
        pin
    }

    /// Where the instant's data of volume track `t` is now: `Some(slot)` once saved,
    /// else None (the volume).
    pub fn location(&self, t: u64) -> Option<u64> {
        self.saved.get(&t).copied()
    }

    /// Slots this generation references (shared slots counted in full).
    pub fn saved_tracks(&self) -> u64 {
        self.saved.len() as u64
    }
}

/// How many generations reference each slot.
#[derive(Debug, Default, Clone)]
pub struct Refs {
    by_slot: HashMap<u64, u32>,
}

impl Refs {
    /// Adds `n` references to `slot`.
    pub fn add(&mut self, slot: u64, n: u32) {
        *self.by_slot.entry(slot).or_default() += n;
    }

    /// Drops one reference to `slot`; true if none is left (the slot is free).
    pub fn drop_one(&mut self, slot: u64) -> bool {
        match self.by_slot.get_mut(&slot) {
            Some(c) if *c > 1 => {
                *c -= 1;
                false
            }
            Some(_) => {
                self.by_slot.remove(&slot);
                true
            }
            None => false,
        }
    }

    /// Slots in use.
    pub fn len(&self) -> usize {
        self.by_slot.len()
    }

    /// True when no slot is in use.
    pub fn is_empty(&self) -> bool {
        self.by_slot.is_empty()
    }
}

/// Of `tracks` (a host write is about to overwrite them), each track some generation
/// must save first, with the generations (indexes into `gens`) that need it.
pub fn plan(gens: &[&Gen], tracks: &[u64]) -> Vec<(u64, Vec<usize>)> {
    let mut out: Vec<(u64, Vec<usize>)> = Vec::new();
    for &t in tracks {
        if out.iter().any(|(u, _)| *u == t) {
            continue;
        }
        let who: Vec<usize> = gens
            .iter()
            .enumerate()
            .filter(|(_, g)| g.needs_save(t))
            .map(|(k, _)| k)
            .collect();
        if !who.is_empty() {
            out.push((t, who));
        }
    }
    out
}

/// Releasing generation `g`: the slots no other generation references any more (to
/// free) — `refs` is updated.
pub fn release_slots(g: &Gen, refs: &mut Refs) -> Vec<u64> {
    let mut free: Vec<u64> = g
        .saved
        .values()
        .copied()
        .filter(|&s| refs.drop_one(s))
        .collect();
    free.sort_unstable();
    free.dedup();
    free
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::extent::ExtentMap;
    use crate::snap::pair::{FrozenAttr, FrozenKind, PairState, Scope};

    fn file(ino: u64, runs: &[(u64, u64)]) -> Frozen {
        let mut extents = ExtentMap::default();
        let mut f = 0;
        for &(v, l) in runs {
            extents.insert(f, v, l);
            f += l;
        }
        Frozen {
            ino,
            path: format!("f{ino}"),
            attr: FrozenAttr {
                kind: FrozenKind::File,
                size: f * 4096,
                ..FrozenAttr::default()
            },
            extents,
            ..Frozen::default()
        }
    }

    fn named(id: PairId, name: &str, frozen: Vec<Frozen>) -> Gen {
        let mut p = Pair::new(id, Scope::File(5), "f".into(), TrackSet::new(), 0);
        p.state = PairState::Split;
        p.frozen = frozen;
        Gen::new(1, name.into(), p)
    }

    #[test]
    fn names() {
        for ok in ["hourly", "d1", "a.b_c-d", &"x".repeat(64)] {
            check_name(ok).unwrap();
        }
        for bad in [
            "",
            "1h",
            "default",
            "a/b",
            "a b",
            ".x",
            &"x".repeat(65),
            "é",
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    /// A model of several generations over one file whose tracks are overwritten in
    /// place between splits: each generation reads back exactly the bytes of its
    /// instant, a track overwritten once after several splits is stored once, and
    /// releasing generations frees exactly the slots nobody else references.
    #[test]
    fn generations_share_saved_tracks_and_read_their_instant() {
        const TRACKS: u64 = 16;
        // The volume: track -> content version; the slots: slot -> content.
        let mut vol: HashMap<u64, u32> = (1..=TRACKS).map(|t| (t, 0)).collect();
        let mut slots: HashMap<u64, u32> = HashMap::new();
        let mut next_slot = 100;
        let mut refs = Refs::default();
        let mut gens: Vec<Gen> = Vec::new();
        let mut expect: Vec<HashMap<u64, u32>> = Vec::new();
        let mut rng = 0x9e3779b97f4a7c15u64;
        let mut rand = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let mut version = 0;
        for round in 0..12 {
            // Split a generation (8 at most alive: release the oldest beyond).
            if gens.len() == 8 {
                let g = gens.remove(0);
                expect.remove(0);
                for s in release_slots(&g, &mut refs) {
                    slots.remove(&s);
                }
            }
            gens.push(named(
                round + 10,
                &format!("g{round}"),
                vec![file(5, &[(1, TRACKS)])],
            ));
            expect.push(vol.clone());
            // Overwrite some tracks, saving first.
            for _ in 0..6 {
                let t = 1 + rand(TRACKS);
                let views: Vec<&Gen> = gens.iter().collect();
                let p = plan(&views, &[t]);
                for (t, who) in p {
                    let s = next_slot;
                    next_slot += 1;
                    slots.insert(s, vol[&t]);
                    refs.add(s, who.len() as u32);
                    for k in who {
                        gens[k].saved.insert(t, s);
                    }
                }
                version += 1;
                vol.insert(t, version);
            }
            // Every generation reads its instant.
            for (g, want) in gens.iter().zip(&expect) {
                for t in 1..=TRACKS {
                    let got = match g.location(t) {
                        Some(s) => slots[&s],
                        None => vol[&t],
                    };
                    assert_eq!(got, want[&t], "generation {} track {t}", g.name);
                }
            }
            // A slot is referenced by every generation that maps it, nothing else.
            let mut counted: HashMap<u64, u32> = HashMap::new();
            for g in &gens {
                for &s in g.saved.values() {
                    *counted.entry(s).or_default() += 1;
                }
            }
            assert_eq!(counted.len(), refs.len());
            assert_eq!(
                counted.len(),
                slots.len(),
                "a slot leaked or was freed early"
            );
        }
        // Sharing: fewer slots than (generation, saved track) pairs.
        let mapped: usize = gens.iter().map(|g| g.saved.len()).sum();
        assert!(
            slots.len() < mapped,
            "{} slots for {mapped} saves",
            slots.len()
        );
        for g in std::mem::take(&mut gens) {
            for s in release_slots(&g, &mut refs) {
                slots.remove(&s);
            }
        }
        assert!(slots.is_empty() && refs.is_empty());
    }

    #[test]
    fn lazy_freeze_pins_and_needs_save() {
        let mut g = named(3, "a", vec![]);
        assert!(!g.needs_save(7));
        let pin = g.lazy_freeze(file(9, &[(7, 2)]));
        assert_eq!(pin.iter().collect::<Vec<_>>(), vec![7, 8]);
        assert!(g.needs_save(7) && g.needs_save(8) && !g.needs_save(9));
        g.saved.insert(7, 50);
        assert!(!g.needs_save(7) && g.location(7) == Some(50));
    }
}
