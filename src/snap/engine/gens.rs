//! Named generations in the engine: split (or refresh) and release of generation NAME
//! of a pair, the save before a host overwrite, reads, the view under `@NAME/`, status
//! and loading. The bookkeeping is pure ([`crate::snap::gens`]); the order of writes is
//! rule 14 of `docs/design.md`:
//!
//! - **Split/refresh/release** run under the write barrier (no host write in flight),
//!   after a destage round (staged writes are acknowledged: they belong before the
//!   instant), and commit the generation's row and records (or their deletion) with a
//!   flush of both images before returning.
//! - **Save before overwrite** ([`Engine::gen_save`]): a host write to a volume track that
//!   a generation pins and has not saved is staged (`Engine::host_write`); the destage
//!   round, under the save lock: allocates slots, copies the old tracks to the slots'
//!   copy-image tracks, syncs the copy image, commits the saved rows (with the slots'
//!   checksums and the records frozen since the last commit) — and only then writes the
//!   patches. A partial-track zeroing saves the same way, synchronously.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLockWriteGuard};

use super::{Engine, Op};
use crate::core::now_ns;
use crate::core::trackset::TrackSet;
use crate::error::{Error, Result};
use crate::meta::{GenRow, PairDelta, StoredGen, take_appends};
use crate::snap::gens::{self, Gen, MAX_PER_PAIR, Refs};
use crate::snap::namespace::Namespace;
use crate::snap::pair::{Frozen, Pair, PairId, Pins, Scope};
use crate::snap::view::{Builder, PartCache};
use crate::store::volume::Volume;

/// One named generation with its lock.
pub struct GenSlot {
    /// Generation id (from the pair id space).
    pub id: PairId,
    g: Mutex<Gen>,
    /// Records frozen since the last commit wait for one.
    dirty: AtomicBool,
}

impl GenSlot {
    fn new(id: PairId, g: Gen) -> GenSlot {
        GenSlot {
            id,
            g: Mutex::new(g),
            dirty: AtomicBool::new(false),
        }
    }

    /// Locks the generation.
    pub fn lock(&self) -> MutexGuard<'_, Gen> {
        self.g.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The engine's generations: by id, the slots' reference counts, the save lock.
#[derive(Default)]
pub struct GenTable {
    by_id: std::sync::RwLock<std::collections::BTreeMap<PairId, Arc<GenSlot>>>,
    refs: Mutex<Refs>,
    save_lock: Mutex<()>,
    any: AtomicBool,
}

/// One line of `user.pairfs.generations`.
#[derive(Debug, Clone)]
pub struct GenStatus {
    /// Generation id.
    pub id: PairId,
    /// Its pair.
    pub pair: PairId,
    /// Name.
    pub name: String,
    /// Scope kind.
    pub scope: &'static str,
    /// Scope path.
    pub path: String,
    /// The instant (ns).
    pub split_ns: i64,
    /// Tracks saved for it (shared slots counted for each generation).
    pub saved_tracks: u64,
    /// Of those, tracks no other generation references (freed by its release).
    pub own_tracks: u64,
    /// Objects recorded (a lazy generation: changed since its instant).
    pub records: usize,
    /// Track size.
    pub track_size: u64,
}

impl GenStatus {
    /// The text line (`pairfs status`).
    pub fn line(&self) -> String {
        format!(
            "generation name={} id={} pair={} scope={} split_time={} saved_tracks={} saved_bytes={} own_bytes={} records={} path={:?}",
            self.name,
            self.id,
            self.pair,
            self.scope,
            super::unix_time(self.split_ns),
            self.saved_tracks,
            self.saved_tracks * self.track_size,
            self.own_tracks * self.track_size,
            self.records,
            self.path
        )
    }
}

fn row_of(g: &Gen) -> GenRow {
    GenRow {
        pair: g.parent,
        name: g.name.clone(),
        split_ns: g.p.split_ns,
        lazy_ino: g.p.lazy.unwrap_or(0),
        scope: g.p.scope,
        path: g.p.path.clone(),
    }
}

/// `path` placed under `@NAME/` in the copy mount.
fn under(name: &str, path: &str) -> String {
    if path.is_empty() {
        format!("@{name}")
    } else {
        format!("@{name}/{path}")
    }
}

impl Engine {
    pub(super) fn gen_slot(&self, id: PairId) -> Option<Arc<GenSlot>> {
        if !self.gens.any.load(Ordering::Acquire) {
            return None;
        }
        self.gens
            .by_id
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }

    fn all_gens(&self) -> Vec<Arc<GenSlot>> {
        if !self.gens.any.load(Ordering::Acquire) {
            return Vec::new();
        }
        self.gens
            .by_id
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// The generations of pair `pid`.
    pub fn gens_of(&self, pid: PairId) -> Vec<PairId> {
        self.all_gens()
            .into_iter()
            .filter(|s| s.lock().parent == pid)
            .map(|s| s.id)
            .collect()
    }

    /// The pair whose members an id's records describe: the pair itself, or a
    /// generation's pair.
    pub fn member_id(&self, id: PairId) -> PairId {
        self.gen_slot(id).map_or(id, |s| s.lock().parent)
    }

    fn find_gen(&self, pid: PairId, name: &str) -> Option<Arc<GenSlot>> {
        self.all_gens().into_iter().find(|s| {
            let g = s.lock();
            g.parent == pid && g.name == name
        })
    }

    /// Tracks every generation but `except` pins.
    fn gen_pins_except(&self, except: Option<PairId>) -> TrackSet {
        let mut s = TrackSet::new();
        for g in self.all_gens() {
            if Some(g.id) != except {
                s.union_with(&g.lock().pins);
            }
        }
        s
    }

    /// Applies a pair's pin changes, keeping pinned what a generation still pins.
    pub(super) fn apply_pins(&self, ns: &dyn Namespace, pins: &Pins) {
        if pins.unpin.is_empty() || !self.gens.any.load(Ordering::Acquire) {
            ns.apply_pins(pins);
            return;
        }
        let keep = self.gen_pins_except(None);
        ns.apply_pins(&Pins {
            pin: pins.pin.clone(),
            unpin: pins.unpin.difference(&keep),
        });
    }

    /// `split`/`update` (refresh) or `release` of generation `name` of the pair whose
    /// scope's top is `ino`. The caller holds the write barrier.
    pub fn gen_control(
        &self,
        ns: &dyn Namespace,
        _barrier: &RwLockWriteGuard<'_, ()>,
        ino: u64,
        name: &str,
        op: Op,
    ) -> Result<()> {
        gens::check_name(name)?;
        self.destage(ns)?;
        let pid = ns
            .pair_of(ino)?
            .ok_or_else(|| Error::invalid("no pair here (pair or split it first)"))?;
        let slot = self
            .slot(pid)
            .ok_or_else(|| Error::NotFound(format!("pair {pid}")))?;
        let (scope, path) = {
            let p = slot.lock();
            (p.scope, p.path.clone())
        };
        if scope.ino() != ino {
            return Err(Error::Busy(format!(
                "inside the scope of pair {pid} ({path}): generations are of a pair's whole \
                 scope (name its top)"
            )));
        }
        let old = self.find_gen(pid, name);
        match op {
            Op::Split | Op::Update => self.gen_split(ns, pid, scope, path, name, old),
            Op::Release => {
                let old = old
                    .ok_or_else(|| Error::NotFound(format!("generation {name:?} of pair {pid}")))?;
                let d = self.gen_drop(ns, &old)?;
                self.frozen_changed();
                ns.commit_destaged(vec![d])?;
                log::info!("pair {pid} ({path}): generation {name} released");
                Ok(())
            }
            _ => Err(Error::invalid(format!(
                "{op:?} does not apply to a generation (split, update or release it)"
            ))),
        }
    }

    fn gen_split(
        &self,
        ns: &dyn Namespace,
        pid: PairId,
        scope: Scope,
        path: String,
        name: &str,
        old: Option<Arc<GenSlot>>,
    ) -> Result<()> {
        if old.is_none() && self.gens_of(pid).len() >= MAX_PER_PAIR {
            return Err(Error::NoSpace("generations of this pair"));
        }
        let now = now_ns();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed).max(1);
        let (frozen, lazy) = match scope {
            Scope::File(_) => (ns.freeze(scope, pid)?, None),
            Scope::Dir(_) | Scope::Root => {
                let mut top = None;
                ns.instant(scope, &mut |t, limit| {
                    top = Some((t, limit));
                    Ok(Pins::default())
                })?;
                let (t, limit) =
                    top.ok_or_else(|| Error::invalid("the scope's top is not a directory"))?;
                (vec![t], Some(limit))
            }
        };
        let p = gens::instant(id, (scope, path.clone()), now, frozen, lazy);
        let g = Gen::new(pid, name.to_string(), p);
        let mut deltas = Vec::new();
        if let Some(old) = &old {
            deltas.push(self.gen_drop(ns, old)?);
        }
        let pin = g.pins.clone();
        let delta = PairDelta {
            id,
            generation: Some(row_of(&g)),
            frozen: Some(g.p.frozen.clone()),
            ..PairDelta::default()
        };
        ns.apply_pins(&Pins {
            pin,
            unpin: TrackSet::new(),
        });
        self.gens
            .by_id
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, Arc::new(GenSlot::new(id, g)));
        self.gens.any.store(true, Ordering::Release);
        self.frozen_changed();
        deltas.push(delta);
        ns.commit_destaged(deltas)?;
        log::info!(
            "pair {pid} ({path}): generation {name} {} (id {id})",
            if old.is_some() { "refreshed" } else { "split" }
        );
        Ok(())
    }

    /// Takes generation `s` out: unpins what nothing else pins, frees the slots no other
    /// generation references (both held until the next commit), and returns the delta
    /// that deletes it.
    fn gen_drop(&self, ns: &dyn Namespace, s: &Arc<GenSlot>) -> Result<PairDelta> {
        self.gens
            .by_id
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&s.id);
        let g = s.lock().clone();
        let mut keep = self.gen_pins_except(Some(s.id));
        for p in self.slots() {
            keep.union_with(&p.lock().pinned_tracks());
        }
        ns.apply_pins(&Pins {
            pin: TrackSet::new(),
            unpin: g.pins.difference(&keep),
        });
        let free = {
            let mut refs = self.gens.refs.lock().unwrap_or_else(|p| p.into_inner());
            gens::release_slots(&g, &mut refs)
        };
        ns.free_slots(&free);
        Ok(PairDelta {
            id: s.id,
            delete: true,
            generation: Some(row_of(&g)),
            ..PairDelta::default()
        })
    }

    /// Of `tracks`, those some generation pins and has not saved (a host write to them
    /// is staged until a destage round saves them).
    pub(super) fn gen_needs(&self, tracks: &[u64]) -> Vec<u64> {
        if !self.gens.any.load(Ordering::Acquire) {
            return Vec::new();
        }
        let all = self.all_gens();
        let locked: Vec<_> = all.iter().map(|s| s.lock()).collect();
        let views: Vec<&Gen> = locked.iter().map(|g| &**g).collect();
        gens::plan(&views, tracks)
            .into_iter()
            .map(|(t, _)| t)
            .collect()
    }

    /// Before a host write or zeroing reaches volume `tracks`: saves each track some
    /// generation pins and has not saved (rule 14). Returns once the saves are durable.
    /// The caller holds the barrier shared and the file's data lock, no other lock.
    pub fn gen_save(&self, ns: &dyn Namespace, tracks: &[u64]) -> Result<()> {
        if !self.gens.any.load(Ordering::Acquire) {
            return Ok(());
        }
        let quick = |gs: &[Arc<GenSlot>]| {
            let locked: Vec<_> = gs.iter().map(|s| s.lock()).collect();
            let views: Vec<&Gen> = locked.iter().map(|g| &**g).collect();
            gens::plan(&views, tracks)
        };
        let all = self.all_gens();
        if quick(&all).is_empty() {
            return Ok(());
        }
        let _save = self
            .gens
            .save_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        ns.check_writable()?;
        let all = self.all_gens();
        let plan = quick(&all);
        if plan.is_empty() {
            return Ok(());
        }
        let slots = match ns.alloc_slots(plan.len() as u64) {
            Ok(s) => s,
            Err(e) => return self.gen_fail(ns, &all, &plan, &e),
        };
        let ts = self.track_size;
        let mut buf = vec![0u8; ts as usize];
        let mut sums = Vec::with_capacity(plan.len());
        let copied = plan.iter().zip(&slots).try_for_each(|((t, _), &s)| {
            self.vol.read_at(t * ts, &mut buf)?;
            self.copy.write_at(s * ts, &buf)?;
            sums.push((s, crate::snap::sums::crc(&buf)));
            Ok::<(), Error>(())
        });
        if let Err(e) = copied.and_then(|_| self.durability.sync_copy(&self.hooks(ns))) {
            ns.free_slots(&slots);
            return self.gen_fail(ns, &all, &plan, &e);
        }
        if self.sums_on {
            let mut st = self.sums.write().unwrap_or_else(|p| p.into_inner());
            for &(k, c) in &sums {
                st.set(k, c);
            }
            drop(st);
            if self.verify_cache {
                let mut v = self.verified.lock().unwrap_or_else(|p| p.into_inner());
                for (k, _) in &sums {
                    v.remove(k);
                }
            }
        }
        // Per generation: its new rows.
        let mut per: HashMap<usize, Vec<(u64, u64)>> = HashMap::new();
        {
            let mut refs = self.gens.refs.lock().unwrap_or_else(|p| p.into_inner());
            for ((t, who), &s) in plan.iter().zip(&slots) {
                refs.add(s, who.len() as u32);
                for &k in who {
                    per.entry(k).or_default().push((*t, s));
                }
            }
        }
        let mut first = true;
        let r = self.durability.commit_pairs(
            &mut || {
                let mut out = Vec::new();
                for (&k, rows) in &per {
                    let s = &all[k];
                    s.dirty.store(false, Ordering::Release);
                    let mut g = s.lock();
                    out.push(PairDelta {
                        id: s.id,
                        append: take_appends(&mut g.p),
                        saved: rows.clone(),
                        sums: if first {
                            std::mem::take(&mut sums)
                        } else {
                            Vec::new()
                        },
                        ..PairDelta::default()
                    });
                    first = false;
                }
                out
            },
            &mut |d| self.restore_deltas(d),
        );
        r?;
        for (&k, rows) in &per {
            let mut g = all[k].lock();
            for &(t, s) in rows {
                g.saved.insert(t, s);
            }
        }
        Ok(())
    }

    /// A save failed (no space for slots, the copy image failed): the generations that
    /// needed it are dropped, durably, before the host write goes on — a host write is
    /// never refused because of a generation, and a generation never reads a track
    /// overwritten unsaved.
    fn gen_fail(
        &self,
        ns: &dyn Namespace,
        all: &[Arc<GenSlot>],
        plan: &[(u64, Vec<usize>)],
        e: &Error,
    ) -> Result<()> {
        let mut who: Vec<usize> = plan.iter().flat_map(|(_, w)| w.iter().copied()).collect();
        who.sort_unstable();
        who.dedup();
        let mut deltas = Vec::new();
        for k in who {
            let s = &all[k];
            let (name, pid) = {
                let g = s.lock();
                (g.name.clone(), g.parent)
            };
            log::error!(
                "pair {pid}: generation {name} dropped: saving a track it needs before an \
                 overwrite failed: {e}"
            );
            deltas.push(self.gen_drop(ns, s)?);
        }
        self.frozen_changed();
        let mut once = Some(deltas);
        self.durability
            .commit_pairs(&mut || once.take().unwrap_or_default(), &mut |_| {})
    }

    /// Deltas of generations with records frozen since the last commit (taken by every
    /// commit, with the pairs').
    pub(super) fn take_dirty_gens(&self) -> Vec<PairDelta> {
        let mut out = Vec::new();
        for s in self.all_gens() {
            if s.dirty.swap(false, Ordering::AcqRel) {
                let mut g = s.lock();
                out.push(PairDelta {
                    id: s.id,
                    append: take_appends(&mut g.p),
                    ..PairDelta::default()
                });
            }
        }
        out
    }

    /// A commit carrying a generation's delta failed: its records are appended again.
    pub(super) fn restore_gen(&self, d: &PairDelta) -> bool {
        let Some(s) = self.gen_slot(d.id) else {
            return false;
        };
        if let Some((k, _)) = d.append.first() {
            let mut g = s.lock();
            g.p.frozen_saved = g.p.frozen_saved.min(*k);
        }
        s.dirty.store(true, Ordering::Release);
        true
    }

    /// Generation `id`'s lazy-freeze hooks (see the pair versions).
    pub(super) fn gen_needs_freeze(&self, id: PairId, ino: u64) -> Option<bool> {
        self.gen_slot(id).map(|s| s.lock().p.needs_freeze(ino))
    }

    pub(super) fn gen_lazy_freeze(&self, id: PairId, f: Frozen) -> Option<TrackSet> {
        let s = self.gen_slot(id)?;
        let pin = s.lock().lazy_freeze(f);
        s.dirty.store(true, Ordering::Release);
        Some(pin)
    }

    pub(super) fn gen_frozen_of<T>(&self, id: PairId, f: impl FnOnce(&Pair) -> T) -> Option<T> {
        self.gen_slot(id).map(|s| f(&s.lock().p))
    }

    /// Every generation's objects, placed under `@NAME/` (by id, in each one's list
    /// order: for a lazy generation, the order of its walk).
    pub(super) fn gen_objects(&self, ns: &dyn Namespace) -> Vec<(PairId, Vec<Frozen>)> {
        let mut out = Vec::new();
        for s in self.all_gens() {
            match self.gen_placed(ns, &s) {
                Ok(placed) => out.push((s.id, placed)),
                Err(e) => log::warn!("generation {}: view incomplete: {e}", s.lock().name),
            }
        }
        out
    }

    /// Generation `s`'s objects placed under `@NAME/` (a lazy one's walked).
    fn gen_placed(&self, ns: &dyn Namespace, s: &GenSlot) -> Result<Vec<Frozen>> {
        let (name, frozen) = {
            let g = s.lock();
            (
                g.name.clone(),
                g.p.lazy.is_none().then(|| g.p.frozen.clone()),
            )
        };
        let objects = match frozen {
            Some(f) => f,
            None => self.gen_lazy_objects(ns, s)?,
        };
        Ok(objects
            .into_iter()
            .map(|f| Frozen {
                path: under(&name, &f.path),
                links: f.links.iter().map(|l| under(&name, l)).collect(),
                ..f
            })
            .collect())
    }

    /// Adds every generation's objects under `@NAME/` to the view being built: each
    /// one's list as kept in `parts` for its instant, else made (a generation's instant
    /// never changes: a refresh makes a new generation).
    pub(super) fn gen_view(&self, ns: &dyn Namespace, b: &mut Builder<'_>, parts: &mut PartCache) {
        for s in self.all_gens() {
            let instant = s.lock().p.instant;
            match parts.get_or_walk(s.id, instant, || self.gen_placed(ns, &s)) {
                Ok(placed) => b.add_pair(s.id, &placed),
                Err(e) => log::warn!("generation {}: view incomplete: {e}", s.lock().name),
            }
        }
    }

    /// Inode of object `idx` of lazy generation `id`'s walk (tests and checks).
    pub(super) fn gen_lazy_ino(
        &self,
        ns: &dyn Namespace,
        id: PairId,
        idx: usize,
    ) -> Result<Option<u64>> {
        match self.gen_slot(id) {
            Some(s) if s.lock().p.lazy.is_some() => {
                Ok(self.gen_lazy_objects(ns, &s)?.get(idx).map(|f| f.ino))
            }
            _ => Ok(None),
        }
    }

    fn gen_lazy_objects(&self, ns: &dyn Namespace, s: &GenSlot) -> Result<Vec<Frozen>> {
        let id = s.id;
        crate::snap::view::lazy_objects(
            |from| {
                if self.gen_slot(id).is_none() {
                    return Err(Error::NotFound("the generation is gone".into()));
                }
                Ok(s.lock()
                    .p
                    .frozen
                    .get(from..)
                    .map(<[Frozen]>::to_vec)
                    .unwrap_or_default())
            },
            |dir, after| ns.instant_children(id, dir, after),
        )
    }

    /// Every named generation's id and instant (see [`Engine::frozen_identity`]), with
    /// its instant number ([`crate::snap::pair::Pair::instant`]).
    pub(super) fn gen_identity(&self) -> Vec<(PairId, i64, u64)> {
        self.all_gens()
            .iter()
            .map(|s| {
                let g = s.lock();
                (s.id, g.p.split_ns, g.p.instant)
            })
            .collect()
    }

    /// The `@NAME` names at the copy mount's root.
    pub(super) fn gen_top_names(&self) -> Vec<Vec<u8>> {
        self.all_gens()
            .iter()
            .map(|s| format!("@{}", s.lock().name).into_bytes())
            .collect()
    }

    /// Reads `dst` of volume track `v` as generation `id` froze it: from its slot once
    /// saved, else from the volume (re-checked after the read: a save that finished
    /// meanwhile may have let the host overwrite the track).
    pub(super) fn gen_read_track(
        &self,
        s: &GenSlot,
        (path, ft, v, in_off): (&str, u64, u64, u64),
        dst: &mut [u8],
    ) -> Result<()> {
        let ts = self.track_size;
        let at = |slot: u64| (s.id, path, ft, slot, in_off);
        match s.lock().location(v) {
            Some(slot) => return self.read_copy(at(slot), dst),
            None => self.vol.read_at(v * ts + in_off, dst)?,
        }
        if let Some(slot) = s.lock().location(v) {
            self.read_copy(at(slot), dst)?;
        }
        Ok(())
    }

    /// The saved tracks of every generation as files to scrub: each record file's
    /// saved tracks, at their slots (`pairfs scrub` checks them with the pairs' copies).
    pub(super) fn gen_scrub_files(&self) -> Vec<crate::snap::sums::ScrubFile> {
        let mut out = Vec::new();
        for s in self.all_gens() {
            let g = s.lock();
            for f in g.p.frozen.iter().filter(|f| !f.absent) {
                let extents: Vec<crate::core::extent::Extent> = f
                    .extents
                    .iter()
                    .flat_map(|e| (0..e.len).map(move |k| (e.file + k, e.vol + k)))
                    .filter_map(|(ft, v)| {
                        g.location(v).map(|slot| crate::core::extent::Extent {
                            file: ft,
                            vol: slot,
                            len: 1,
                        })
                    })
                    .collect();
                if !extents.is_empty() {
                    out.push(crate::snap::sums::ScrubFile {
                        pair: s.id,
                        path: under(&g.name, &f.path),
                        extents,
                    });
                }
            }
        }
        out
    }

    /// Status lines of every generation.
    pub fn gen_status(&self) -> Vec<GenStatus> {
        let refs = self
            .gens
            .refs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut out: Vec<GenStatus> = self
            .all_gens()
            .iter()
            .map(|s| {
                let g = s.lock();
                let mut probe = refs.clone();
                GenStatus {
                    id: s.id,
                    pair: g.parent,
                    name: g.name.clone(),
                    scope: g.p.scope.kind(),
                    path: g.p.path.clone(),
                    split_ns: g.p.split_ns,
                    saved_tracks: g.saved_tracks(),
                    own_tracks: gens::release_slots(&g, &mut probe).len() as u64,
                    records: g.p.frozen.len(),
                    track_size: self.track_size,
                }
            })
            .collect();
        out.sort_by(|a, b| (a.pair, &a.name).cmp(&(b.pair, &b.name)));
        out
    }

    /// Installs the stored generations at mount: records, pins, slots in use.
    pub fn load_gens(&self, ns: &dyn Namespace, stored: Vec<StoredGen>) -> Result<()> {
        let mut max = self.next_id.load(Ordering::Relaxed);
        let mut refs = Refs::default();
        let mut slots_used: Vec<u64> = Vec::new();
        for sg in stored {
            if self.slot(sg.row.pair).is_none() {
                return Err(Error::Corrupt(format!(
                    "generation {} ({}) belongs to pair {}, which does not exist",
                    sg.id, sg.row.name, sg.row.pair
                )));
            }
            let p = gens::instant(
                sg.id,
                (sg.row.scope, sg.row.path.clone()),
                sg.row.split_ns,
                sg.frozen,
                (sg.row.lazy_ino > 0).then_some(sg.row.lazy_ino),
            );
            let mut g = Gen::new(sg.row.pair, sg.row.name, p);
            for (v, s) in sg.saved {
                g.saved.insert(v, s);
                refs.add(s, 1);
                slots_used.push(s);
            }
            ns.pin_frozen(sg.id, &g.pins)?;
            max = max.max(sg.id + 1);
            self.gens
                .by_id
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(sg.id, Arc::new(GenSlot::new(sg.id, g)));
            self.gens.any.store(true, Ordering::Release);
        }
        slots_used.sort_unstable();
        slots_used.dedup();
        ns.mark_slots(&slots_used)?;
        *self.gens.refs.lock().unwrap_or_else(|p| p.into_inner()) = refs;
        self.next_id.store(max, Ordering::Relaxed);
        Ok(())
    }

    /// The byte ranges of file `ino` (extents `now`, size `size`) changed since the
    /// instant of generation `name` of pair `pid`: the tracks it saved are the ones
    /// overwritten since (a pinned track is saved before its first overwrite), and a
    /// track the file maps now that the record does not name was allocated since.
    pub fn gen_diff(
        &self,
        pid: PairId,
        name: &str,
        ino: u64,
        now: &crate::core::extent::ExtentMap,
        size: u64,
    ) -> Result<crate::snap::diff::FileDiff> {
        let s = self
            .find_gen(pid, name)
            .ok_or_else(|| Error::NotFound(format!("generation {name:?} of pair {pid}")))?;
        let g = s.lock();
        let written: TrackSet = g.saved.keys().copied().collect();
        let mut d = self.diff_with(pid, &g.p, &written, ino, now, size);
        d.state = format!("generation:{name}");
        Ok(d)
    }

    /// True if pair `pid` has named generations (a file cannot be split off its group
    /// then: their records name the file's tracks where they are).
    pub fn has_gens(&self, pid: PairId) -> bool {
        !self.gens_of(pid).is_empty()
    }

    /// A pair being released takes its generations with it: the deltas that delete
    /// them.
    pub(super) fn drop_gens_of(&self, ns: &dyn Namespace, pid: PairId) -> Result<Vec<PairDelta>> {
        let mut out = Vec::new();
        for id in self.gens_of(pid) {
            if let Some(s) = self.gen_slot(id) {
                out.push(self.gen_drop(ns, &s)?);
            }
        }
        Ok(out)
    }
}
