//! The pair engine: pairs in memory, copy-on-write, the background copier and the
//! control operations (pair, split, update, resync, release). The state machine itself
//! is pure ([`crate::snap::pair`]); this module does the I/O and the locking around it.
//!
//! Durability rules implemented here (see `docs/design.md`):
//! - **Copy-on-write** ([`Engine::cow`]): under the pair's `gate`, copy the old tracks
//!   to the copy image, `sync` the copy image, commit the cleared pending bits to the
//!   metadata store, and only then let the host write proceed.
//! - **Copier, frozen states**: the same order, a batch at a time.
//! - **Copier, forming states**: bits are cleared *before* the track is read (a host
//!   write that lands during the copy sets the bit again), nothing is synced per batch;
//!   after an unclean shutdown every track of such a pair is recopied.
//! - **Split/update**: under the write barrier (no host write in flight) and the gate
//!   (no copy in flight), sync both images and commit the frozen map, pins and bitmaps
//!   in one transaction before returning.
//! - **Frozen reads** read a track from the volume while its pending bit is set, then
//!   re-check the bit: if a copy-on-write finished meanwhile, re-read from the copy.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use crate::core::fs::{Fs, ROOT, State as FsState, now_ns};
use crate::core::trackset::TrackSet;
use crate::error::{Error, Result};
use crate::meta::{PairDelta, PairRow, take_dirty_chunks};
use crate::snap::pair::{Frozen, FrozenAttr, FrozenKind, Pair, PairId, Pins, Scope, State};
use crate::store::volume::Volume;

/// Largest copier batch in bytes (bounded memory; a host copy-on-write waits for at
/// most one batch).
pub const COPY_BATCH_BYTES: u64 = 1 << 20;
/// Copy-on-write also copies the other pending tracks of the same aligned group.
pub const COW_GROUP_BYTES: u64 = 1 << 20;
/// In the frozen states the copier syncs the copy image and commits the cleared bits
/// once per this many bytes copied, not per batch.
pub const CONFIRM_BYTES: u64 = 64 << 20;

/// One pair with its locks.
pub struct Slot {
    /// Pair id.
    pub id: PairId,
    /// Serializes every copy of this pair's tracks (copier batches, copy-on-write,
    /// split and update instants).
    pub gate: Mutex<()>,
    /// The pair.
    pub p: Mutex<Pair>,
    dirty: AtomicBool,
    /// Frozen states: tracks the copier wrote to the copy image but whose pending bits
    /// stay set until the copy image is synced and the clear committed
    /// ([`Engine::confirm`]). Only touched under `gate`.
    unconfirmed: Mutex<Vec<u64>>,
    /// Tracks host writes are waiting to have copied (group commit: the next holder of
    /// `gate` copies all of them with one sync and one commit).
    cow_queue: Mutex<Vec<u64>>,
    /// Set once the pair is released: the copier and persist leave it alone.
    released: AtomicBool,
}

impl Slot {
    /// Locks the pair.
    pub fn lock(&self) -> MutexGuard<'_, Pair> {
        self.p.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn gate(&self) -> MutexGuard<'_, ()> {
        self.gate.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Control operations, by `user.pairfs.*` name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Create a pair (forming).
    Pair,
    /// Freeze the copy now.
    Split,
    /// Refresh the frozen copy to now.
    Update,
    /// Leave the frozen state, back to formed.
    Resync,
    /// Delete the pair.
    Release,
}

impl Op {
    /// Parses `pair`, `split`, ...
    pub fn parse(s: &str) -> Option<Op> {
        Some(match s {
            "pair" => Op::Pair,
            "split" => Op::Split,
            "update" => Op::Update,
            "resync" => Op::Resync,
            "release" => Op::Release,
            _ => return None,
        })
    }
}

/// All pairs.
#[derive(Default)]
pub struct Engine {
    pairs: RwLock<BTreeMap<PairId, Arc<Slot>>>,
    next_id: AtomicU64,
    work: Mutex<u64>,
    work_cv: Condvar,
    stopping: AtomicBool,
    last_host_io: AtomicI64,
    /// Tracks copied by the copier and by copy-on-write since mount.
    pub copied_total: AtomicU64,
    /// Tracks copied by copy-on-write since mount.
    pub cow_total: AtomicU64,
}

/// A snapshot of one pair for status displays.
#[derive(Debug, Clone)]
pub struct PairStatus {
    /// Id.
    pub id: PairId,
    /// Scope kind.
    pub scope: &'static str,
    /// Path.
    pub path: String,
    /// State name.
    pub state: &'static str,
    /// Tracks still to copy.
    pub to_copy: u64,
    /// Progress counters.
    pub total: u64,
    /// Copied so far in this operation.
    pub copied: u64,
    /// Tracks copied by the last finished operation.
    pub last_copied: u64,
    /// Operation start (ns).
    pub started_ns: i64,
    /// Split/update instant (ns).
    pub split_ns: i64,
    /// Tracks in the frozen copy.
    pub frozen_tracks: u64,
    /// Tracks written since the instant.
    pub dirty: u64,
    /// Bytes held only by the frozen copy.
    pub pinned_bytes: u64,
    /// Frozen files.
    pub files: usize,
    /// Error text.
    pub error: Option<String>,
    /// Track size (for byte figures).
    pub track_size: u64,
}

fn unix_time(ns: i64) -> String {
    // RFC 3339 in UTC, without pulling a date crate in.
    let secs = ns.div_euclid(1_000_000_000);
    let nanos = ns.rem_euclid(1_000_000_000);
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        nanos
    )
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719468;
    let era = z.div_euclid(146097);
    let doe = z.rem_euclid(146097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

impl PairStatus {
    /// The one-line text of `user.pairfs.state`.
    pub fn line(&self) -> String {
        let pct = if self.total == 0 {
            100.0
        } else {
            100.0 * (self.total - self.to_copy.min(self.total)) as f64 / self.total as f64
        };
        let mut s = format!(
            "{} pair={} scope={} progress={:.1}% to_copy={} copied={} last_copied={} frozen_tracks={} dirty_tracks={} pinned_bytes={} files={}",
            self.state,
            self.id,
            self.scope,
            pct,
            self.to_copy,
            self.copied,
            self.last_copied,
            self.frozen_tracks,
            self.dirty,
            self.pinned_bytes,
            self.files
        );
        if self.to_copy > 0 && self.copied > 0 {
            let secs = ((now_ns() - self.started_ns).max(1)) as f64 / 1e9;
            let rate = self.copied as f64 * self.track_size as f64 / secs;
            let eta = self.to_copy as f64 * self.track_size as f64 / rate.max(1.0);
            s.push_str(&format!(" rate_bps={rate:.0} eta_s={eta:.1}"));
        }
        if self.split_ns > 0 {
            s.push_str(&format!(" split_time={}", unix_time(self.split_ns)));
        }
        if let Some(e) = &self.error {
            s.push_str(&format!(" error={:?}", e));
        }
        s
    }
}

impl Engine {
    fn slot(&self, id: PairId) -> Option<Arc<Slot>> {
        self.pairs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }

    fn slots(&self) -> Vec<Arc<Slot>> {
        self.pairs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Members of a scope: every inode beneath it (or the file itself), all cached.
    fn members(fs: &Fs, st: &mut FsState, scope: Scope) -> Result<Vec<u64>> {
        match scope {
            Scope::File(i) => Ok(if fs.try_want(st, i)? {
                vec![i]
            } else {
                Vec::new()
            }),
            Scope::Dir(i) => fs.subtree(st, i),
            Scope::Root => fs.subtree(st, ROOT),
        }
    }

    /// The inodes a pair covers now: the file, or the inodes beneath its directory
    /// that carry this pair (a file with a pair of its own stays out). All cached.
    fn members_of(fs: &Fs, st: &mut FsState, scope: Scope, id: PairId) -> Result<Vec<u64>> {
        let mut v = Self::members(fs, st, scope)?;
        if !matches!(scope, Scope::File(_)) {
            v.retain(|i| st.inodes.get(i).is_some_and(|n| n.pair == Some(id)));
        }
        Ok(v)
    }

    /// Current tracks of the inodes a pair covers, walking its scope with the cache
    /// kept within its budget (linear in the scope, bounded memory).
    fn scope_tracks(fs: &Fs, st: &mut FsState, scope: Scope, id: PairId) -> Result<TrackSet> {
        let mut s = TrackSet::new();
        let top = match scope {
            Scope::File(i) => {
                if fs.try_want(st, i)? {
                    s.insert_extents(&st.get(i)?.extents);
                }
                return Ok(s);
            }
            Scope::Dir(i) => i,
            Scope::Root => ROOT,
        };
        fs.walk(st, top, true, |_, n| {
            if n.pair == Some(id) {
                s.insert_extents(&n.extents);
            }
        })?;
        Ok(s)
    }

    /// Installs loaded pairs: pins and unclean-shutdown recovery.
    ///
    /// Membership is not stored, nor rebuilt here: an inode finds its pair when it is
    /// loaded ([`Fs::want`]): the pair it is the top of, else the pair whose frozen
    /// map holds it (it needs copy-on-write wherever it moved), else its parent's.
    pub fn load(&self, fs: &Fs, mut pairs: Vec<Pair>, clean: bool, next_pair: u64) -> Result<()> {
        let mut max = next_pair.max(1);
        pairs.sort_by_key(|p| (p.scope.rank(), p.id));
        let mut slots = Vec::new();
        {
            let mut st = fs.state();
            for p in pairs {
                for t in p.pinned_tracks().iter() {
                    if t == 0 || t >= st.alloc.total() {
                        return Err(Error::Corrupt(format!(
                            "pair {}: frozen track {t} outside the volume",
                            p.id
                        )));
                    }
                    st.alloc.pin(t);
                }
                max = max.max(p.id + 1);
                let slot = Arc::new(Slot {
                    id: p.id,
                    gate: Mutex::new(()),
                    p: Mutex::new(p),
                    dirty: AtomicBool::new(!clean),
                    unconfirmed: Mutex::new(Vec::new()),
                    cow_queue: Mutex::new(Vec::new()),
                    released: AtomicBool::new(false),
                });
                slots.push(slot.clone());
                self.pairs
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(slot.id, slot);
            }
        }
        self.next_id.store(max, Ordering::Relaxed);
        // Every pair is known now, so inodes loaded from here on find their pair.
        for slot in slots {
            let (scope, path) = {
                let p = slot.lock();
                (p.scope, p.path.clone())
            };
            let mut st = fs.state();
            if !fs.try_want(&mut st, scope.ino())? {
                log::warn!(
                    "pair {} ({}): its file is gone; its frozen copy stays until \
                     `setfattr -n user.pairfs.release -v {} MOUNTPOINT`",
                    slot.id,
                    path,
                    slot.id
                );
            }
            if !clean {
                let current = Self::scope_tracks(fs, &mut st, scope, slot.id)?;
                let mut p = slot.lock();
                p.recover_unclean(&current);
                log::warn!(
                    "pair {} ({}): unclean shutdown, treating every track as changed ({})",
                    p.id,
                    p.path,
                    p.state.name()
                );
            }
        }
        Ok(())
    }

    /// True if any pair exists.
    pub fn has_pairs(&self) -> bool {
        !self
            .pairs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// The pair whose scope has `ino` at its top (the root for the root pair).
    pub fn owner_of(&self, ino: u64) -> Option<PairId> {
        self.slots().into_iter().find_map(|s| {
            let scope = s.lock().scope;
            (scope.ino() == ino && !s.released.load(Ordering::Acquire)).then_some(s.id)
        })
    }

    /// Of the pairs `ids` (whose frozen maps hold an inode), the one that claims it:
    /// the most specific scope, then the lowest id.
    pub fn first_claim(&self, ids: &[PairId]) -> Option<PairId> {
        ids.iter()
            .filter_map(|&id| self.slot(id))
            .filter(|s| !s.released.load(Ordering::Acquire))
            .map(|s| (s.lock().scope.rank(), s.id))
            .min()
            .map(|(_, id)| id)
    }

    /// True if new inodes beneath a member directory join this pair.
    pub fn inherits(&self, id: PairId) -> bool {
        self.slot(id)
            .is_some_and(|s| matches!(s.lock().scope, Scope::Dir(_) | Scope::Root))
    }

    /// Records a host write (after the data reached the volume).
    pub fn written(&self, id: PairId, tracks: &[u64]) {
        if tracks.is_empty() {
            return;
        }
        if let Some(s) = self.slot(id) {
            s.lock().written(tracks);
            s.dirty.store(true, Ordering::Release);
            self.wake();
        }
    }

    /// Records tracks a live file of the pair no longer maps.
    pub fn freed(&self, id: PairId, tracks: &[u64]) {
        if let Some(s) = self.slot(id) {
            s.lock().freed(tracks);
            s.dirty.store(true, Ordering::Release);
        }
    }

    /// Notes host activity (the copier yields to it).
    pub fn host_io(&self) {
        self.last_host_io.store(now_ns(), Ordering::Relaxed);
    }

    fn wake(&self) {
        let mut w = self.work.lock().unwrap_or_else(|p| p.into_inner());
        *w += 1;
        self.work_cv.notify_all();
    }

    /// Stops the copier.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        self.wake();
    }

    /// True if some pair has changes to commit.
    pub fn any_dirty(&self) -> bool {
        self.slots().iter().any(|s| s.dirty.load(Ordering::Acquire))
    }

    /// Row and dirty chunks of every dirty pair. Call with the metadata lock held, so
    /// that chunk states reach the database in the order they were taken.
    pub fn take_dirty_pairs(&self) -> Vec<PairDelta> {
        let mut out = Vec::new();
        for s in self.slots() {
            if s.dirty.swap(false, Ordering::AcqRel) {
                let mut p = s.lock();
                out.push(PairDelta {
                    id: s.id,
                    row: Some(PairRow::of(&p)),
                    chunks: take_dirty_chunks(&mut p),
                    ..PairDelta::default()
                });
            }
        }
        out
    }

    /// Commits one pair's row and bitmaps now (durable on return).
    fn persist(&self, fs: &Fs, slot: &Slot, frozen: bool) -> Result<()> {
        if slot.released.load(Ordering::Acquire) {
            // Never resurrect the row of a released pair.
            return Ok(());
        }
        let mut meta = fs.meta.lock().unwrap_or_else(|p| p.into_inner());
        slot.dirty.store(false, Ordering::Release);
        let delta = {
            let mut p = slot.lock();
            PairDelta {
                id: slot.id,
                row: Some(PairRow::of(&p)),
                chunks: take_dirty_chunks(&mut p),
                frozen: frozen.then(|| p.frozen.clone()),
                ..PairDelta::default()
            }
        };
        let r = meta.commit(&crate::meta::Batch {
            pairs: vec![delta],
            ..Default::default()
        });
        if let Err(e) = &r {
            // The taken chunks are lost and bits may be clear in memory only: refuse
            // every further change rather than let a host write skip a copy.
            log::error!(
                "pair {}: metadata commit failed: {e}; refusing further changes",
                slot.id
            );
            fs.poison_meta();
            slot.lock().mark_all_dirty();
            slot.dirty.store(true, Ordering::Release);
        }
        r
    }

    /// Puts every pair in `error` (the copy image failed a sync: none of the copies on
    /// it can be trusted).
    pub fn fail_all(&self, fs: &Fs, e: &Error) {
        for s in self.slots() {
            let st = s.lock().state;
            if st != State::Error {
                self.fail(fs, &s, e);
            }
        }
    }

    /// Copies volume tracks to the same addresses on the copy image.
    fn copy_tracks(fs: &Fs, tracks: &[u64]) -> Result<()> {
        let ts = fs.ts;
        let max_run = (COPY_BATCH_BYTES / ts).max(1);
        let mut buf = Vec::new();
        let mut i = 0;
        while i < tracks.len() {
            let mut j = i + 1;
            while j < tracks.len() && tracks[j] == tracks[j - 1] + 1 && ((j - i) as u64) < max_run {
                j += 1;
            }
            let len = ((j - i) as u64 * ts) as usize;
            buf.resize(len, 0);
            fs.vol.read_at(tracks[i] * ts, &mut buf)?;
            if buf.iter().all(|&b| b == 0) {
                // Never-written (fallocated or punched) tracks: keep the copy sparse.
                fs.copy.discard(tracks[i] * ts, len as u64)?;
            } else {
                fs.copy.write_at(tracks[i] * ts, &buf)?;
            }
            i = j;
        }
        Ok(())
    }

    /// A copy failed: the pair goes to `error`, its pins are dropped.
    fn fail(&self, fs: &Fs, slot: &Slot, e: &Error) {
        slot.unconfirmed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        let msg = format!("copy to the copy image failed: {e}; run update or resync to recover");
        let pins = slot.lock().fail(msg.clone());
        log::error!("pair {}: state error: {msg}", slot.id);
        slot.dirty.store(true, Ordering::Release);
        // The error state (no frozen map) is durable before its tracks can be reused.
        match self.persist(fs, slot, true) {
            Ok(()) => Self::apply_pins(fs, &pins),
            Err(e2) => log::error!(
                "pair {}: cannot record the error state ({e2}); its tracks stay pinned",
                slot.id
            ),
        }
    }

    fn apply_pins(fs: &Fs, pins: &Pins) {
        let mut st = fs.state();
        st.alloc.pin_set(&pins.pin);
        st.alloc.unpin_set(&pins.unpin);
    }

    /// Copy-on-write before a host write to `tracks` of pair `id`. Never fails the host
    /// write because of the copy image: a failed copy puts the pair in `error`.
    pub fn cow(&self, fs: &Fs, id: PairId, tracks: &[u64]) -> Result<()> {
        let Some(slot) = self.slot(id) else {
            return Ok(());
        };
        let mine = slot.lock().cow_needed(tracks);
        if mine.is_empty() {
            return Ok(());
        }
        // Group commit: queue our tracks; whoever holds the gate next copies every
        // queued track with one sync of the copy image and one metadata commit.
        slot.cow_queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(&mine);
        let _g = slot.gate();
        fs.check_writable()?;
        let mut want =
            std::mem::take(&mut *slot.cow_queue.lock().unwrap_or_else(|p| p.into_inner()));
        want.extend_from_slice(&mine);
        let need = {
            let p = slot.lock();
            // Copy ahead: the pending tracks of the same aligned group (up to 1 MiB)
            // cost little more to copy now and spare later writes a sync each.
            let group = (COW_GROUP_BYTES / fs.ts).max(1);
            let mut around = std::collections::BTreeSet::new();
            for &t in &want {
                let g0 = t - t % group;
                around.extend(g0..g0 + group);
            }
            let around: Vec<u64> = around.into_iter().collect();
            p.cow_needed(&around)
        };
        if need.is_empty() {
            return Ok(());
        }
        let before = slot.lock().state;
        match Self::copy_tracks(fs, &need).and_then(|_| fs.copy.sync()) {
            Ok(()) => {
                // The sync also makes the copier's unconfirmed tracks durable.
                let mut done = std::mem::take(
                    &mut *slot.unconfirmed.lock().unwrap_or_else(|p| p.into_inner()),
                );
                done.extend_from_slice(&need);
                slot.lock().begin_clear(&done);
                self.cow_total
                    .fetch_add(need.len() as u64, Ordering::Relaxed);
                self.copied_total
                    .fetch_add(need.len() as u64, Ordering::Relaxed);
                // The cleared bits must be durable before the host overwrites the track;
                // until then `clearing` keeps other writers waiting on the gate.
                self.persist(fs, &slot, false)?;
                slot.lock().end_clear();
                self.log_transition(&slot, before);
            }
            Err(e) => self.fail(fs, &slot, &e),
        }
        Ok(())
    }

    fn log_transition(&self, slot: &Slot, before: State) {
        let p = slot.lock();
        if p.state != before {
            log::info!(
                "pair {} ({}): {} -> {} ({} tracks copied)",
                p.id,
                p.path,
                before.name(),
                p.state.name(),
                p.progress.last_copied
            );
        }
    }

    /// Makes the copier's unconfirmed tracks durable: sync the copy image, clear their
    /// pending bits and commit. Call with the gate held.
    fn confirm(&self, fs: &Fs, slot: &Slot) -> Result<()> {
        let tracks =
            std::mem::take(&mut *slot.unconfirmed.lock().unwrap_or_else(|p| p.into_inner()));
        if tracks.is_empty() {
            return Ok(());
        }
        if slot.released.load(Ordering::Acquire) {
            return Ok(());
        }
        let before = slot.lock().state;
        fs.copy.sync()?;
        slot.lock().begin_clear(&tracks);
        self.persist(fs, slot, false)?;
        slot.lock().end_clear();
        self.log_transition(slot, before);
        Ok(())
    }

    /// One copier batch for one pair. Returns the number of tracks copied.
    fn copy_batch(&self, fs: &Fs, slot: &Slot, cursor: &mut u64) -> usize {
        let _g = slot.gate();
        if slot.released.load(Ordering::Acquire) {
            return 0;
        }
        let max = (COPY_BATCH_BYTES / fs.ts).max(1) as usize;
        let (batch, frozen, before) = {
            let mut p = slot.lock();
            let Some(pending) = p.pending() else { return 0 };
            let unconfirmed = slot.unconfirmed.lock().unwrap_or_else(|p| p.into_inner());
            let skip = |t: &u64| !unconfirmed.contains(t);
            let mut batch: Vec<u64> =
                pending.next_batch(*cursor, max + unconfirmed.len().min(4096));
            batch.retain(skip);
            batch.truncate(max);
            if batch.is_empty() {
                batch = pending.next_batch(0, max + unconfirmed.len());
                batch.retain(skip);
                batch.truncate(max);
            }
            let frozen = p.state.is_frozen();
            let before = p.state;
            if batch.is_empty() {
                drop(unconfirmed);
                drop(p);
                // Everything left is copied: make it durable.
                if let Err(e) = self.confirm(fs, slot) {
                    self.fail(fs, slot, &e);
                }
                return 0;
            }
            drop(unconfirmed);
            if !frozen {
                // Forming: clear first; a concurrent host write sets the bit again.
                p.copied(&batch);
                slot.dirty.store(true, Ordering::Release);
            }
            (batch, frozen, before)
        };
        *cursor = batch.last().map_or(0, |t| t + 1);
        match Self::copy_tracks(fs, &batch) {
            Ok(()) => {
                self.copied_total
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                if frozen {
                    let n = {
                        let mut u = slot.unconfirmed.lock().unwrap_or_else(|p| p.into_inner());
                        u.extend_from_slice(&batch);
                        u.len() as u64
                    };
                    if n * fs.ts >= CONFIRM_BYTES
                        && let Err(e) = self.confirm(fs, slot)
                    {
                        self.fail(fs, slot, &e);
                        return 0;
                    }
                } else {
                    self.log_transition(slot, before);
                    if slot.lock().state != before {
                        // Record the new state promptly.
                        let _ = self.persist(fs, slot, false);
                    }
                }
                batch.len()
            }
            Err(e) => {
                self.fail(fs, slot, &e);
                0
            }
        }
    }

    /// One copier round: one batch of every pair with pending tracks, round-robin.
    /// Returns the number of tracks copied (0: nothing to do).
    pub fn copy_round(&self, fs: &Fs, cursors: &mut BTreeMap<PairId, u64>) -> usize {
        let mut did = 0;
        for s in self.slots() {
            if self.stopping.load(Ordering::Acquire) {
                break;
            }
            // Host first: while the host wrote in the last 5 ms, give it 2 ms between
            // batches (one batch is at most 1 MiB).
            let idle_ns = now_ns() - self.last_host_io.load(Ordering::Relaxed);
            if idle_ns < 5_000_000 {
                std::thread::sleep(Duration::from_millis(2));
            }
            let c = cursors.entry(s.id).or_insert(0);
            did += self.copy_batch(fs, &s, c);
        }
        did
    }

    /// The background copier loop: [`Engine::copy_round`] until nothing is pending,
    /// then sleep until woken. Returns when the engine stops.
    pub fn run_copier(&self, fs: &Fs) {
        let mut cursors: BTreeMap<PairId, u64> = BTreeMap::new();
        loop {
            if self.stopping.load(Ordering::Acquire) {
                for s in self.slots() {
                    let _g = s.gate();
                    if let Err(e) = self.confirm(fs, &s) {
                        log::warn!("pair {}: copies of the last round not confirmed: {e}", s.id);
                    }
                }
                return;
            }
            let seen = *self.work.lock().unwrap_or_else(|p| p.into_inner());
            if self.copy_round(fs, &mut cursors) == 0 {
                let w = self.work.lock().unwrap_or_else(|p| p.into_inner());
                if *w == seen && !self.stopping.load(Ordering::Acquire) {
                    let _ = self
                        .work_cv
                        .wait_timeout(w, Duration::from_millis(500))
                        .unwrap_or_else(|p| p.into_inner());
                }
            }
        }
    }

    /// Builds the frozen objects of a scope from the current state.
    fn freeze(fs: &Fs, st: &mut FsState, members: &[u64]) -> Result<Vec<Frozen>> {
        let mut out = Vec::new();
        for &ino in members {
            if !st.inodes.contains_key(&ino) {
                continue;
            }
            let path = fs.path_of(st, ino)?;
            let Some(i) = st.inodes.get(&ino) else {
                continue;
            };
            let kind = match i.row.kind {
                libc::S_IFREG => FrozenKind::File,
                libc::S_IFDIR => FrozenKind::Dir,
                libc::S_IFLNK => FrozenKind::Symlink,
                _ => continue,
            };
            out.push(Frozen {
                ino,
                path,
                attr: FrozenAttr {
                    kind,
                    perm: i.row.perm,
                    uid: i.row.uid,
                    gid: i.row.gid,
                    size: i.row.size,
                    atime: i.row.atime,
                    mtime: i.row.mtime,
                    ctime: i.row.ctime,
                },
                extents: if kind == FrozenKind::File {
                    i.extents.clone()
                } else {
                    Default::default()
                },
                target: i.row.target.clone().unwrap_or_default(),
            });
        }
        Ok(out)
    }

    /// Runs a control operation on the inode `ino`.
    pub fn control(&self, fs: &Fs, ino: u64, op: Op) -> Result<()> {
        if fs.opts.readonly {
            return Err(Error::ReadOnly);
        }
        let _b = fs.barrier.write().unwrap_or_else(|p| p.into_inner());
        let existing = fs.state_with(ino)?.get(ino)?.pair;
        let slot = match (existing, op) {
            (Some(id), _) => {
                let s = self
                    .slot(id)
                    .ok_or_else(|| Error::NotFound(format!("pair {id}")))?;
                let top = s.lock().scope.ino();
                if top != ino {
                    let path = s.lock().path.clone();
                    return Err(Error::Busy(format!(
                        "inside the scope of pair {id} ({path})"
                    )));
                }
                if op == Op::Pair {
                    return Err(Error::invalid("already paired"));
                }
                s
            }
            (None, Op::Pair | Op::Split) => self.create(fs, ino)?,
            (None, _) => return Err(Error::invalid("no pair here (pair or split it first)")),
        };
        if op == Op::Pair {
            // The new pair (state, bitmaps, memberships) is durable before we return.
            fs.commit(Vec::new())?;
            self.wake();
            return Ok(());
        }
        self.run_locked(fs, slot, op)
    }

    /// Runs `op` on pair `id` directly, e.g. to release a pair whose file was deleted
    /// (`setfattr -n user.pairfs.release -v ID MOUNTPOINT`).
    pub fn control_id(&self, fs: &Fs, id: PairId, op: Op) -> Result<()> {
        if fs.opts.readonly {
            return Err(Error::ReadOnly);
        }
        if op == Op::Pair {
            return Err(Error::invalid("pair takes a path, not a pair id"));
        }
        let _b = fs.barrier.write().unwrap_or_else(|p| p.into_inner());
        let slot = self
            .slot(id)
            .ok_or_else(|| Error::NotFound(format!("pair {id}")))?;
        self.run_locked(fs, slot, op)
    }

    /// The body of a control operation; the caller holds the write barrier.
    fn run_locked(&self, fs: &Fs, slot: Arc<Slot>, op: Op) -> Result<()> {
        let _g = slot.gate();
        // Copies made for the current instant become durable before it changes.
        if let Err(e) = self.confirm(fs, &slot) {
            self.fail(fs, &slot, &e);
        }
        let before = slot.lock().state;
        let now = now_ns();
        let scope = slot.lock().scope;
        let frozen_changed = match op {
            Op::Split | Op::Update => {
                let frozen = {
                    let mut st = fs.state();
                    let members = Self::members_of(fs, &mut st, scope, slot.id)?;
                    Self::freeze(fs, &mut st, &members)?
                };
                let pins = {
                    let mut p = slot.lock();
                    if op == Op::Split {
                        p.split(frozen, now)?
                    } else {
                        p.update(frozen, now)?
                    }
                };
                fs.copy.clear_poison();
                Self::apply_pins(fs, &pins);
                true
            }
            Op::Resync => {
                let current = Self::scope_tracks(fs, &mut fs.state(), scope, slot.id)?;
                let pins = slot.lock().resync(&current, now)?;
                fs.copy.clear_poison();
                Self::apply_pins(fs, &pins);
                true
            }
            Op::Release => {
                slot.released.store(true, Ordering::Release);
                let pins = slot.lock().release();
                Self::apply_pins(fs, &pins);
                // Give the copy image's space back: the frozen tracks and the mirror
                // of the scope's current tracks.
                let mirror = Self::scope_tracks(fs, &mut fs.state(), scope, slot.id)?;
                let mut runs: Vec<(u64, u64)> = Vec::new();
                for t in pins.unpin.union(&mirror).iter() {
                    match runs.last_mut() {
                        Some((s, l)) if *s + *l == t => *l += 1,
                        _ => runs.push((t, 1)),
                    }
                }
                for (t, n) in runs {
                    if let Err(e) = fs.copy.discard(t * fs.ts, n * fs.ts) {
                        log::warn!("pair {}: could not release copy-image space: {e}", slot.id);
                        break;
                    }
                }
                {
                    // Out of the engine first (under the state lock), so that no inode
                    // loaded from now on finds this pair; then out of the cached ones.
                    let mut st = fs.state();
                    self.pairs
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&slot.id);
                    for i in st.inodes.values_mut() {
                        if i.pair == Some(slot.id) {
                            i.pair = None;
                        }
                    }
                }
                fs.commit(vec![PairDelta {
                    id: slot.id,
                    delete: true,
                    ..PairDelta::default()
                }])?;
                log::info!(
                    "pair {} ({}): {} -> released",
                    slot.id,
                    slot.lock().path,
                    before.name()
                );
                return Ok(());
            }
            Op::Pair => unreachable!("handled above"),
        };
        slot.dirty.store(true, Ordering::Release);
        let frozen = frozen_changed.then(|| slot.lock().frozen.clone());
        // The flush barrier: both images synced, then the frozen map, pins and bitmaps
        // committed in one transaction.
        fs.commit(vec![PairDelta {
            id: slot.id,
            frozen,
            ..PairDelta::default()
        }])?;
        if scope == Scope::Root && op != Op::Resync {
            self.snapshot_meta(fs, slot.id)?;
        }
        let after = slot.lock().state;
        log::info!(
            "pair {} ({}): {} -> {} ({op:?})",
            slot.id,
            slot.lock().path,
            before.name(),
            after.name()
        );
        self.wake();
        Ok(())
    }

    /// Writes the metadata snapshot of a whole-volume split beside the database.
    fn snapshot_meta(&self, fs: &Fs, id: PairId) -> Result<()> {
        let Some(path) = fs.snapshot_path(id) else {
            return Ok(());
        };
        fs.meta
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .snapshot_to(&path)?;
        log::info!("pair {id}: metadata snapshot written to {}", path.display());
        Ok(())
    }

    fn create(&self, fs: &Fs, ino: u64) -> Result<Arc<Slot>> {
        let mut st = fs.state_with(ino)?;
        let i = st.get(ino)?;
        let scope = match i.row.kind {
            libc::S_IFREG => Scope::File(ino),
            libc::S_IFDIR if ino == ROOT => Scope::Root,
            libc::S_IFDIR => Scope::Dir(ino),
            _ => {
                return Err(Error::invalid(
                    "only regular files and directories can be paired",
                ));
            }
        };
        let members = Self::members(fs, &mut st, scope)?;
        for &m in &members {
            if let Some(other) = st.get(m)?.pair {
                return Err(Error::Busy(format!(
                    "{} is already in pair {other}",
                    fs.path_of(&mut st, m)?
                )));
            }
        }
        for &m in &members {
            st.get_mut(m)?.pair = Some(0);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed).max(1);
        for &m in &members {
            st.get_mut(m)?.pair = Some(id);
        }
        let current = Fs::tracks_of(&st, &members);
        let path = format!("/{}", fs.path_of(&mut st, ino)?);
        let p = Pair::new(id, scope, path.clone(), current, now_ns());
        let slot = Arc::new(Slot {
            id,
            gate: Mutex::new(()),
            p: Mutex::new(p),
            dirty: AtomicBool::new(true),
            unconfirmed: Mutex::new(Vec::new()),
            cow_queue: Mutex::new(Vec::new()),
            released: AtomicBool::new(false),
        });
        // Registered before the state lock is released: a member evicted and loaded
        // again finds its pair through the engine.
        self.pairs
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, slot.clone());
        drop(st);
        log::info!("pair {id} ({path}): created, forming ({})", scope.kind());
        Ok(slot)
    }

    /// Status of the pair that holds `ino` (None if unpaired).
    pub fn status_of(&self, fs: &Fs, ino: u64) -> Result<Option<PairStatus>> {
        let Some(id) = fs.state_with(ino)?.get(ino)?.pair else {
            return Ok(None);
        };
        Ok(self.slot(id).map(|s| self.status(fs, &s)))
    }

    /// Status of every pair.
    pub fn all_status(&self, fs: &Fs) -> Vec<PairStatus> {
        self.slots().iter().map(|s| self.status(fs, s)).collect()
    }

    fn status(&self, fs: &Fs, s: &Slot) -> PairStatus {
        // Lock order is state -> pair: count pinned tracks before locking the pair.
        let pinned = s.lock().pinned_tracks();
        let pinned_only = {
            let st = fs.state();
            pinned.iter().filter(|&t| !st.alloc.is_used(t)).count() as u64
        };
        let p = s.lock();
        let dirty = match p.state {
            State::Updating => p.update_diff.count(),
            State::Splitting | State::Split => p.split_diff.count(),
            _ => p.forming.count(),
        };
        PairStatus {
            id: p.id,
            scope: p.scope.kind(),
            path: p.path.clone(),
            state: p.state.name(),
            to_copy: p.pending().map_or(0, TrackSet::count),
            total: p.progress.total,
            copied: p.progress.copied,
            last_copied: p.progress.last_copied,
            started_ns: p.progress.started_ns,
            split_ns: p.split_ns,
            frozen_tracks: pinned.count(),
            dirty,
            pinned_bytes: pinned_only * fs.ts,
            files: p
                .frozen
                .iter()
                .filter(|f| f.attr.kind == FrozenKind::File)
                .count(),
            error: p.error.clone(),
            track_size: fs.ts,
        }
    }

    /// Every frozen object offered by the copy mount: (pair id, index, object).
    pub fn frozen_objects(&self) -> Vec<(PairId, usize, Frozen)> {
        let mut out = Vec::new();
        for s in self.slots() {
            let p = s.lock();
            if p.state.is_frozen() {
                for (i, f) in p.frozen.iter().enumerate() {
                    out.push((p.id, i, f.clone()));
                }
            }
        }
        out
    }

    /// Reads frozen file `idx` of pair `id` as of its split instant.
    pub fn read_frozen(
        &self,
        fs: &Fs,
        id: PairId,
        idx: usize,
        off: u64,
        size: u32,
    ) -> Result<Vec<u8>> {
        self.read_frozen_of(fs, (id, idx, None), off, size)
    }

    /// [`Engine::read_frozen`], refusing (ESTALE) when the object at `idx` is no longer
    /// inode `ino` (an update reordered the frozen list since the caller looked it up).
    pub fn read_frozen_of(
        &self,
        fs: &Fs,
        (id, idx, ino): (PairId, usize, Option<u64>),
        off: u64,
        size: u32,
    ) -> Result<Vec<u8>> {
        let slot = self
            .slot(id)
            .ok_or_else(|| Error::NotFound(format!("pair {id}")))?;
        let ts = fs.ts;
        let (segs, len) = {
            let p = slot.lock();
            if !p.state.is_frozen() {
                return Err(Error::NotFound("the frozen copy is gone".into()));
            }
            let f = p
                .frozen
                .get(idx)
                .ok_or_else(|| Error::NotFound("frozen file".into()))?;
            if ino.is_some_and(|i| i != f.ino) {
                return Err(Error::Stale);
            }
            if off >= f.attr.size {
                return Ok(Vec::new());
            }
            let len = (size as u64).min(f.attr.size - off);
            let f0 = off / ts;
            let f1 = (off + len - 1) / ts;
            (f.extents.segments(f0, f1 - f0 + 1), len)
        };
        let mut buf = vec![0u8; len as usize];
        for s in segs {
            let Some(v0) = s.vol else { continue };
            for k in 0..s.len {
                let ft = s.file + k;
                let v = v0 + k;
                let a = (ft * ts).max(off);
                let b = ((ft + 1) * ts).min(off + len);
                if a >= b {
                    continue;
                }
                let dst = &mut buf[(a - off) as usize..(b - off) as usize];
                let voff = v * ts + (a - ft * ts);
                if slot.lock().read_from_volume(v) {
                    fs.vol.read_at(voff, dst)?;
                    // A copy-on-write may have finished (and the host overwritten the
                    // track) while we read: then the copy image has the frozen data.
                    if !slot.lock().read_from_volume(v) {
                        fs.copy.read_at(voff, dst)?;
                    }
                } else {
                    fs.copy.read_at(voff, dst)?;
                }
            }
        }
        Ok(buf)
    }
}
