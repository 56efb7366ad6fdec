//! The pair engine: pairs in memory, copy-on-write, the background copier and the
//! control operations (pair, split, update, resync, release). The state machine itself
//! is pure ([`crate::snap::pair`]); this module does the I/O and the locking around it.
//!
//! The engine is built ([`Engine::new`]) with the handles it works on: both images, the
//! track size, the durability pipeline, the metadata store. It never sees the filesystem
//! object: everything it needs from the namespace goes through
//! [`Namespace`], which the core implements and passes to
//! each call. Split instants belong to the core facade (`Fs::control`): it takes the
//! write barrier and hands its guard to [`Engine::control`].
//!
//! Locks: the order is in [`crate::core::locks`]; syncs and commits go through
//! [`crate::core::durability`].
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

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockWriteGuard};
use std::time::Duration;

use crate::core::durability::{Durability, PairHooks};
use crate::core::extent::Segment;
use crate::core::now_ns;
use crate::core::trackset::TrackSet;
use crate::error::{Error, Result};
use crate::meta::{Meta, PairDelta, PairRow, take_appends, take_dirty_chunks};
use crate::snap::namespace::Namespace;
use crate::snap::pair::{Frozen, FrozenKind, Pair, PairId, PairState, Scope};
use crate::snap::stage::{StageTable, Staged};
use crate::snap::sums::{ScrubReport, SumTable};
use crate::snap::view::{Builder, FrozenView, Numbering, PartCache};
use crate::store::volume::{Checked, Volume};

mod gens;
pub use gens::GenStatus;

/// Largest copier batch in bytes (bounded memory; a host copy-on-write waits for at
/// most one batch).
pub const COPY_BATCH_BYTES: u64 = 1 << 20;
/// Copy-on-write also copies the other pending tracks of the same aligned group.
pub const COW_GROUP_BYTES: u64 = 1 << 20;
/// In the frozen states the copier syncs the copy image and commits the cleared bits
/// once per this many bytes copied, not per batch.
pub const CONFIRM_BYTES: u64 = 64 << 20;
/// Most bytes of host writes held in memory for staged copy-on-write; a writer beyond it
/// runs a destage round itself first.
pub const STAGE_LIMIT_BYTES: u64 = 128 << 20;

/// A piece of a host write: bytes at `off` inside volume track `track`.
#[derive(Debug, Clone, Copy)]
pub struct Piece<'a> {
    /// Volume track.
    pub track: u64,
    /// Offset inside the track.
    pub off: u64,
    /// The bytes.
    pub data: &'a [u8],
}

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
    /// Host writes of this pair staged for copy-on-write since mount (tracks).
    staged: AtomicU64,
    /// Tracks of this pair copied by copy-on-write since mount.
    cow: AtomicU64,
    /// Checksums of this pair's copies not yet committed: taken into the next commit of
    /// the pair's bitmaps, so a committed clear bit always has its sum.
    new_sums: Mutex<Vec<(u64, u32)>>,
    /// Frozen reads refused since mount for a checksum mismatch.
    sum_errors: AtomicU64,
}

impl Slot {
    /// A slot for pair `p` (dirty: its row is written by the next commit).
    fn new(p: Pair) -> Slot {
        Slot {
            id: p.id,
            gate: Mutex::new(()),
            p: Mutex::new(p),
            dirty: AtomicBool::new(true),
            unconfirmed: Mutex::new(Vec::new()),
            cow_queue: Mutex::new(Vec::new()),
            released: AtomicBool::new(false),
            staged: AtomicU64::new(0),
            cow: AtomicU64::new(0),
            new_sums: Mutex::new(Vec::new()),
            sum_errors: AtomicU64::new(0),
        }
    }

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
    /// A file pair inside a directory or root pair (split on its own, third
    /// embodiment) ends and the file joins the group pair again: its tracks are
    /// recorded as written there, so the group's next update or split covers it.
    Join,
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
            "join" => Op::Join,
            _ => return None,
        })
    }
}

/// All pairs. Built by the core with the handles it works on; everything it needs
/// from the namespace goes through [`Namespace`], passed to each call.
pub struct Engine {
    /// The volume image.
    vol: Arc<Checked>,
    /// The copy image.
    copy: Arc<Checked>,
    /// Track size.
    track_size: u64,
    /// Every sync and commit of pair state goes through here.
    durability: Arc<Durability>,
    /// The copy image's file, locked against snapshot mounts while the root pair
    /// rewrites it.
    copy_path: Mutex<Option<PathBuf>>,
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
    /// Host writes staged until their old tracks are durable on the copy image.
    stage: Mutex<StageTable>,
    /// Number of staged tracks (lets the write and read paths skip the stage lock).
    staged_now: AtomicUsize,
    /// Wakes the destager; tells writers a round finished.
    stage_cv: Condvar,
    /// One destage round at a time.
    destage_lock: Mutex<()>,
    /// Tracks staged since mount.
    pub staged_total: AtomicU64,
    /// Whether the volume was unmounted cleanly before this mount (set by
    /// [`Engine::load`]; false after a crash, when every pair's tracks count as changed).
    pub clean_at_load: AtomicBool,
    /// Bumped after every change of the set of frozen objects (split, update, resync,
    /// release, error, load); the view is rebuilt when it is behind.
    view_gen: AtomicU64,
    /// The current frozen view.
    view: RwLock<Arc<FrozenView>>,
    /// Serializes rebuilds; keeps inode numbers stable across them.
    view_numbering: Mutex<Numbering>,
    /// The walked parts of the view (lazy pairs, named generations) by instant, kept
    /// between rebuilds; taken only by a rebuild, right after `view_numbering`.
    view_parts: Mutex<PartCache>,
    /// Told (without blocking) after every change of the frozen set, e.g. so a copy
    /// mount can drop the kernel's cached names of the old view.
    view_watchers: Mutex<Vec<std::sync::mpsc::Sender<u64>>>,
    /// Checksums on ([`crate::snap::sums::enabled_by_env`]).
    sums_on: bool,
    /// The crc32c of every copy-image track as last written by a copy.
    sums: RwLock<SumTable>,
    /// Tracks a frozen read verified, with the sum they matched (a new copy changes the
    /// sum, so the entry no longer counts): later reads of them skip the whole-track
    /// read. Bounded: cleared when it reaches [`VERIFIED_MAX`] entries.
    verified: Mutex<HashMap<u64, u32>>,
    /// Whether `verified` is used (`PAIRFS_SUMS_CACHE=0` turns it off, to measure it).
    verify_cache: bool,
    /// Frozen reads refused since mount because a track did not match its sum.
    pub sum_errors: AtomicU64,
    /// The sum of a track of zeros (a discarded all-zero copy).
    zero_sum: u32,
    /// Named generations ([`crate::snap::gens`]).
    gens: gens::GenTable,
}

/// Most entries of the verified-track cache (16 bytes each).
pub const VERIFIED_MAX: usize = 1 << 20;

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
    /// Host writes staged for copy-on-write since mount (tracks).
    pub staged: u64,
    /// Tracks copied by copy-on-write since mount.
    pub cow: u64,
    /// Frozen reads of this pair refused since mount: a copy-image track did not match
    /// its checksum (run `pairfs scrub`).
    pub sum_errors: u64,
}

/// A clone's backing that cannot be read (EIO: the clone's data is missing, not the
/// clone itself).
fn backing_gone(msg: String) -> Error {
    Error::io("clone backing", std::io::Error::other(msg))
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
        if self.sum_errors > 0 {
            s.push_str(&format!(" sum_errors={}", self.sum_errors));
        }
        if self.staged > 0 {
            s.push_str(&format!(" staged_tracks={}", self.staged));
        }
        if self.cow > 0 {
            s.push_str(&format!(" cow_tracks={}", self.cow));
        }
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

/// What the engine is built with ([`Engine::new`]).
pub struct Handles {
    /// The volume image.
    pub vol: Arc<Checked>,
    /// The copy image.
    pub copy: Arc<Checked>,
    /// Track size.
    pub track_size: u64,
    /// The durability pipeline.
    pub durability: Arc<Durability>,
    /// The copy image's file, if it is one.
    pub copy_path: Option<PathBuf>,
}

impl Engine {
    /// An engine without pairs; [`Engine::load`] installs the stored ones.
    pub fn new(h: Handles) -> Engine {
        Engine {
            vol: h.vol,
            copy: h.copy,
            track_size: h.track_size,
            durability: h.durability,
            copy_path: Mutex::new(h.copy_path),
            pairs: RwLock::default(),
            next_id: AtomicU64::default(),
            work: Mutex::default(),
            work_cv: Condvar::default(),
            stopping: AtomicBool::default(),
            last_host_io: AtomicI64::default(),
            copied_total: AtomicU64::default(),
            cow_total: AtomicU64::default(),
            stage: Mutex::default(),
            staged_now: AtomicUsize::default(),
            stage_cv: Condvar::default(),
            destage_lock: Mutex::default(),
            staged_total: AtomicU64::default(),
            clean_at_load: AtomicBool::default(),
            view_gen: AtomicU64::default(),
            view: RwLock::default(),
            view_numbering: Mutex::default(),
            view_parts: Mutex::default(),
            view_watchers: Mutex::default(),
            sums_on: crate::snap::sums::enabled_by_env(),
            sums: RwLock::default(),
            verified: Mutex::default(),
            verify_cache: !matches!(std::env::var("PAIRFS_SUMS_CACHE").as_deref(), Ok("0")),
            sum_errors: AtomicU64::default(),
            zero_sum: crate::snap::sums::crc(&vec![0u8; h.track_size as usize]),
            gens: gens::GenTable::default(),
        }
    }

    /// Installs the stored checksums (at mount, before serving).
    pub fn load_sums(&self, tracks: u64, sums: &[(u64, u32)]) {
        *self.sums.write().unwrap_or_else(|p| p.into_inner()) = SumTable::new(tracks, sums);
    }

    /// Tracks with a stored or pending checksum.
    pub fn sums_count(&self) -> u64 {
        self.sums.read().unwrap_or_else(|p| p.into_inner()).count()
    }

    fn sum_of(&self, t: u64) -> Option<u32> {
        if !self.sums_on {
            return None;
        }
        self.sums.read().unwrap_or_else(|p| p.into_inner()).get(t)
    }

    /// Records the sums of tracks just written to the copy image by a copy of `slot`'s
    /// tracks: in the table at once (reads of them still come from the volume until
    /// their pending bits clear), and in the slot's list for its next bitmap commit.
    fn record_sums(&self, slot: &Slot, sums: Vec<(u64, u32)>) {
        if sums.is_empty() {
            return;
        }
        {
            let mut t = self.sums.write().unwrap_or_else(|p| p.into_inner());
            for &(k, c) in &sums {
                t.set(k, c);
            }
        }
        if self.verify_cache {
            let mut v = self.verified.lock().unwrap_or_else(|p| p.into_inner());
            for (k, _) in &sums {
                v.remove(k);
            }
        }
        slot.new_sums
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(sums);
    }

    fn take_sums(slot: &Slot) -> Vec<(u64, u32)> {
        std::mem::take(&mut *slot.new_sums.lock().unwrap_or_else(|p| p.into_inner()))
    }

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

    /// Installs loaded pairs: pins and unclean-shutdown recovery.
    ///
    /// Membership is not stored, nor rebuilt here: an inode finds its pair when it is
    /// loaded (`Fs::want` in the core): the pair it is the top of, else the pair whose frozen
    /// map holds it (it needs copy-on-write wherever it moved), else its parent's.
    pub fn load(
        &self,
        ns: &dyn Namespace,
        mut pairs: Vec<Pair>,
        clean: bool,
        next_pair: u64,
    ) -> Result<()> {
        self.clean_at_load.store(clean, Ordering::Relaxed);
        let mut max = next_pair.max(1);
        pairs.sort_by_key(|p| (p.scope.rank(), p.id));
        let mut slots = Vec::new();
        {
            for p in pairs {
                ns.pin_frozen(p.id, &p.pinned_tracks())?;
                max = max.max(p.id + 1);
                let slot = Arc::new(Slot::new(p));
                // A stored pair's row is as on disk after a clean unmount.
                slot.dirty.store(!clean, Ordering::Relaxed);
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
            if !ns.exists(scope.ino())? {
                log::warn!(
                    "pair {} ({}): its file is gone; its frozen copy stays until \
                     `setfattr -n user.pairfs.release -v {} MOUNTPOINT`",
                    slot.id,
                    path,
                    slot.id
                );
            }
            if !clean {
                let current = ns.scope_tracks(scope, slot.id)?;
                let mut p = slot.lock();
                // Bits of tracks the members no longer map (a file that left the
                // scope) must not be copied over another pair's frozen copy.
                if p.retain_tracks(&current) {
                    log::info!(
                        "pair {} ({}): dropped bits of tracks its members no longer map",
                        p.id,
                        p.path
                    );
                }
                p.recover_unclean(&current);
                log::warn!(
                    "pair {} ({}): unclean shutdown, treating every track as changed ({})",
                    p.id,
                    p.path,
                    p.state.name()
                );
            }
        }
        self.frozen_changed();
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
            let copies = {
                let mut p = s.lock();
                p.written(tracks);
                // Only the unfrozen states give the copier new work; in the frozen ones
                // a write just records split-diff/update-diff (no thread to wake).
                matches!(
                    p.state,
                    PairState::Forming | PairState::Formed | PairState::Resyncing
                )
            };
            s.dirty.store(true, Ordering::Release);
            if copies {
                self.wake();
            }
        }
    }

    /// True if pair `id`'s frozen copy holds inode `ino` (it keeps copy-on-write
    /// wherever it moves), [`Pair::holds`].
    pub fn holds(&self, id: PairId, ino: u64) -> bool {
        self.slot(id).is_some_and(|s| s.lock().holds(ino))
    }

    /// True if inode `ino` must be frozen in pair `id` before its first change (a lazy
    /// instant that has not frozen it yet, [`Pair::needs_freeze`]).
    pub fn needs_freeze(&self, id: PairId, ino: u64) -> bool {
        if let Some(n) = self.gen_needs_freeze(id, ino) {
            return n;
        }
        self.slot(id).is_some_and(|s| s.lock().needs_freeze(ino))
    }

    /// Where a lazy pair's frozen map places inode `ino`: None if it is not frozen
    /// there, Some(None) if it is marked absent, else its instant path.
    pub fn frozen_path(&self, id: PairId, ino: u64) -> Option<Option<String>> {
        if let Some(r) = self.gen_frozen_of(id, |p| {
            p.frozen_of(ino)
                .map(|f| (!f.absent).then(|| f.path.clone()))
        }) {
            return r;
        }
        let s = self.slot(id)?;
        let p = s.lock();
        p.frozen_of(ino)
            .map(|f| (!f.absent).then(|| f.path.clone()))
    }

    /// Pair `id`'s record of `ino` (None if it has none; an absent marker is returned
    /// as it is).
    pub fn frozen_record(&self, id: PairId, ino: u64) -> Option<Frozen> {
        let s = self.slot(id)?;
        let p = s.lock();
        p.frozen_of(ino).cloned()
    }

    /// The instant's record of `ino` in lazy pair `id`, if frozen: its size and the
    /// segments of file tracks `[f0, f0+n)`, or Some(None) for an absent marker.
    fn lazy_record(
        &self,
        id: PairId,
        ino: u64,
        f0: u64,
        n: u64,
    ) -> Option<Option<(u64, Vec<Segment>)>> {
        if let Some(r) = self.gen_frozen_of(id, |p| {
            p.frozen_of(ino)
                .map(|f| (!f.absent).then(|| (f.attr.size, f.extents.segments(f0, n))))
        }) {
            return r;
        }
        let s = self.slot(id)?;
        let p = s.lock();
        p.frozen_of(ino)
            .map(|f| (!f.absent).then(|| (f.attr.size, f.extents.segments(f0, n))))
    }

    /// Adds the instant's record of one object to lazy pair `id` (the caller, holding
    /// the namespace lock, checked [`Engine::needs_freeze`] and is about to change the
    /// object). Returns the tracks to pin now. The next commit appends the record.
    pub fn lazy_freeze(&self, id: PairId, f: Frozen) -> TrackSet {
        if self.gen_slot(id).is_some() {
            return self.gen_lazy_freeze(id, f).unwrap_or_default();
        }
        let Some(s) = self.slot(id) else {
            return TrackSet::new();
        };
        let pin = s.lock().lazy_freeze(f);
        s.dirty.store(true, Ordering::Release);
        pin
    }

    /// Size of file `ino` at lazy pair `id`'s instant and the segments of its file tracks
    /// `[f0, f0+n)`, under the namespace lock (`live`: the namespace's live state, valid
    /// only while the pair has not frozen the inode: both are asked under that one lock).
    pub fn instant_file_of(
        &self,
        id: PairId,
        (ino, f0, n): (u64, u64, u64),
        live: impl FnOnce() -> Result<(u64, Vec<Segment>)>,
    ) -> Result<(u64, Vec<Segment>)> {
        match self.lazy_record(id, ino, f0, n) {
            Some(Some(r)) => Ok(r),
            Some(None) => Err(Error::NotFound("frozen file".into())),
            None => live(),
        }
    }

    /// A file left pair `id`'s scope (and its frozen copy does not hold it): the pair
    /// forgets its tracks, so its copier never writes them over another pair's frozen
    /// copy at the same addresses.
    pub fn left(&self, id: PairId, tracks: &[u64]) {
        if let Some(s) = self.slot(id)
            && s.lock().drop_tracks(tracks)
        {
            s.dirty.store(true, Ordering::Release);
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
        let _s = self.stage_table();
        self.stage_cv.notify_all();
    }

    /// True if some pair has changes to commit.
    pub fn any_dirty(&self) -> bool {
        self.slots().iter().any(|s| s.dirty.load(Ordering::Acquire))
    }

    /// Row and dirty chunks of every dirty pair. Takes the held metadata lock as proof,
    /// so that chunk states reach the database in the order they were taken.
    pub fn take_dirty_pairs(&self, _meta: &MutexGuard<'_, Meta>) -> Vec<PairDelta> {
        let mut out = Vec::new();
        for s in self.slots() {
            if s.dirty.swap(false, Ordering::AcqRel) {
                let mut p = s.lock();
                out.push(PairDelta {
                    id: s.id,
                    row: Some(PairRow::of(&p)),
                    chunks: take_dirty_chunks(&mut p),
                    sums: Self::take_sums(&s),
                    append: take_appends(&mut p),
                    ..PairDelta::default()
                });
            }
        }
        out.extend(self.take_dirty_gens());
        out
    }

    /// Commits one pair's row and bitmaps now (durable on return), through the
    /// durability pipeline. On failure every later change is refused and the pair's
    /// chunks are all marked dirty again.
    fn persist(&self, slot: &Slot, frozen: bool) -> Result<()> {
        if slot.released.load(Ordering::Acquire) {
            // Never resurrect the row of a released pair.
            return Ok(());
        }
        self.durability.commit_pairs(
            &mut || {
                slot.dirty.store(false, Ordering::Release);
                let mut p = slot.lock();
                let whole = frozen.then(|| p.frozen.clone());
                if whole.is_some() {
                    p.frozen_saved = p.frozen.len();
                }
                vec![PairDelta {
                    id: slot.id,
                    row: Some(PairRow::of(&p)),
                    chunks: take_dirty_chunks(&mut p),
                    sums: Self::take_sums(slot),
                    append: take_appends(&mut p),
                    frozen: whole,
                    ..PairDelta::default()
                }]
            },
            &mut |d| self.restore_deltas(d),
        )
    }

    /// A commit carrying `deltas` failed: the taken chunks are lost and bits may be
    /// clear in memory only, so every chunk of those pairs is dirty again.
    fn restore_deltas(&self, deltas: &[PairDelta]) {
        for d in deltas.iter().filter(|d| !d.delete) {
            if self.restore_gen(d) {
                continue;
            }
            if let Some(s) = self.slot(d.id) {
                let mut p = s.lock();
                p.mark_all_dirty();
                // Frozen objects the failed commit carried are appended again.
                if d.frozen.is_some() {
                    p.frozen_saved = 0;
                } else if let Some((k, _)) = d.append.first() {
                    p.frozen_saved = p.frozen_saved.min(*k);
                }
                drop(p);
                s.new_sums
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend_from_slice(&d.sums);
                s.dirty.store(true, Ordering::Release);
            }
        }
    }

    /// The engine's side of a commit, for the durability pipeline.
    pub fn hooks<'a>(&'a self, ns: &'a dyn Namespace) -> Hooks<'a> {
        Hooks { engine: self, ns }
    }

    /// Puts every pair in `error` (the copy image failed a sync: none of the copies on
    /// it can be trusted).
    pub fn fail_all(&self, ns: &dyn Namespace, e: &Error) {
        for s in self.slots() {
            let st = s.lock().state;
            if st != PairState::Error {
                self.fail(ns, &s, e);
            }
        }
    }

    /// Copies volume tracks of `slot`'s pair to the same addresses on the copy image,
    /// recording the checksum of each ([`Engine::record_sums`]).
    fn copy_tracks(&self, slot: &Slot, tracks: &[u64]) -> Result<()> {
        let ts = self.track_size;
        let max_run = (COPY_BATCH_BYTES / ts).max(1);
        let mut buf = Vec::new();
        let mut sums = Vec::new();
        let zero_sum = self.sums_on.then_some(self.zero_sum);
        let mut i = 0;
        while i < tracks.len() {
            let mut j = i + 1;
            while j < tracks.len() && tracks[j] == tracks[j - 1] + 1 && ((j - i) as u64) < max_run {
                j += 1;
            }
            let len = ((j - i) as u64 * ts) as usize;
            buf.resize(len, 0);
            self.vol.read_at(tracks[i] * ts, &mut buf)?;
            if buf.iter().all(|&b| b == 0) {
                // Never-written (fallocated or punched) tracks: keep the copy sparse.
                self.copy.discard(tracks[i] * ts, len as u64)?;
                if let Some(z) = zero_sum {
                    sums.extend(tracks[i..j].iter().map(|&t| (t, z)));
                }
            } else {
                self.copy.write_at(tracks[i] * ts, &buf)?;
                if self.sums_on {
                    sums.extend(
                        tracks[i..j]
                            .iter()
                            .zip(buf.chunks(ts as usize))
                            .map(|(&t, d)| (t, crate::snap::sums::crc(d))),
                    );
                }
            }
            i = j;
        }
        self.record_sums(slot, sums);
        Ok(())
    }

    /// A copy failed: the pair goes to `error`, its pins are dropped.
    fn fail(&self, ns: &dyn Namespace, slot: &Slot, e: &Error) {
        if slot.lock().state == PairState::Error {
            // Already failed (e.g. by every pair failing on a copy-image sync).
            return;
        }
        slot.unconfirmed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        let msg = format!("copy to the copy image failed: {e}; run update or resync to recover");
        let pins = slot.lock().fail(msg.clone());
        self.frozen_changed();
        log::error!("pair {}: state error: {msg}", slot.id);
        slot.dirty.store(true, Ordering::Release);
        // The error state (no frozen map) is durable before its tracks can be reused.
        match self.persist(slot, true) {
            Ok(()) => self.apply_pins(ns, &pins),
            Err(e2) => log::error!(
                "pair {}: cannot record the error state ({e2}); its tracks stay pinned",
                slot.id
            ),
        }
    }

    /// Copy-on-write before a host write to `tracks` of pair `id`. Never fails the host
    /// write because of the copy image: a failed copy puts the pair in `error`.
    pub fn cow(&self, ns: &dyn Namespace, id: PairId, tracks: &[u64]) -> Result<()> {
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
        ns.check_writable()?;
        let mut want =
            std::mem::take(&mut *slot.cow_queue.lock().unwrap_or_else(|p| p.into_inner()));
        want.extend_from_slice(&mine);
        let need = {
            let p = slot.lock();
            // Copy ahead: the pending tracks of the same aligned group (up to 1 MiB)
            // cost little more to copy now and spare later writes a sync each.
            let group = (COW_GROUP_BYTES / self.track_size).max(1);
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
        let hooks = self.hooks(ns);
        match self
            .copy_tracks(&slot, &need)
            .and_then(|_| self.durability.sync_copy(&hooks))
        {
            Ok(()) => {
                // The sync also makes the copier's unconfirmed tracks durable.
                let mut done = std::mem::take(
                    &mut *slot.unconfirmed.lock().unwrap_or_else(|p| p.into_inner()),
                );
                done.extend_from_slice(&need);
                slot.lock().begin_clear(&done);
                self.cow_total
                    .fetch_add(need.len() as u64, Ordering::Relaxed);
                slot.cow.fetch_add(need.len() as u64, Ordering::Relaxed);
                self.copied_total
                    .fetch_add(need.len() as u64, Ordering::Relaxed);
                // The cleared bits must be durable before the host overwrites the track;
                // until then `clearing` keeps other writers waiting on the gate.
                self.persist(&slot, false)?;
                slot.lock().end_clear();
                self.log_transition(&slot, before);
            }
            Err(e) => self.fail(ns, &slot, &e),
        }
        Ok(())
    }

    fn stage_table(&self) -> MutexGuard<'_, StageTable> {
        self.stage.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes host data into mapped volume tracks of a file of pair `pid` (or of no
    /// pair). A write to a track whose old content the frozen copy still needs is
    /// *staged*: its bytes are kept as a patch of the track (see [`crate::snap::stage`])
    /// and reach the volume only after [`Engine::destage`] copied the old track, synced
    /// the copy image and cleared its bit durably. Returns without any copy or sync.
    ///
    /// Lock order: the caller holds the barrier (shared) and the file's data lock, not
    /// the state lock. Here the stage table is taken before a pair's lock, never after.
    pub fn host_write(
        &self,
        ns: &dyn Namespace,
        pid: Option<PairId>,
        pieces: &[Piece<'_>],
    ) -> Result<()> {
        let ts = self.track_size;
        let tracks: Vec<u64> = pieces.iter().map(|p| p.track).collect();
        // Tracks a named generation must save first: staged too, the save runs in the
        // destage round (rule 14 holds there: saved and committed before the patch).
        let gen_need = self.gen_needs(&tracks);
        let slot = pid
            .and_then(|p| self.slot(p))
            .filter(|s| !s.released.load(Ordering::Acquire));
        let need: Vec<u64> = match &slot {
            Some(s) => s.lock().cow_needed(&tracks),
            None => Vec::new(),
        };
        if need.is_empty() && gen_need.is_empty() && self.staged_now.load(Ordering::Acquire) == 0 {
            for p in pieces {
                self.vol.write_at(p.track * ts + p.off, p.data)?;
            }
            return Ok(());
        }
        if !(need.is_empty() && gen_need.is_empty())
            && self.stage_table().bytes() > STAGE_LIMIT_BYTES
        {
            // Bounded memory: make room before staging more.
            self.destage(ns)?;
        }
        let mut direct = Vec::new();
        let mut staged = 0u64;
        {
            let mut st = self.stage_table();
            for p in pieces {
                if st.patch(p.track, p.off, p.data) {
                    continue;
                }
                if let (Some(slot), Some(pid)) = (&slot, pid)
                    && need.contains(&p.track)
                    && !slot.lock().cow_needed(&[p.track]).is_empty()
                {
                    // Pending and not staged: nothing overwrites the track on the volume
                    // until the destager has copied it (bits only go from set to clear
                    // while we hold the barrier).
                    st.insert(p.track, pid, p.off, p.data);
                    staged += 1;
                    continue;
                }
                if gen_need.contains(&p.track) && !self.gen_needs(&[p.track]).is_empty() {
                    // A generation still needs the old track: nothing overwrites it on the
                    // volume until a destage round has saved it (saves only happen there,
                    // under the destage lock, or in a zeroing that holds this file's data
                    // lock exclusively).
                    st.insert(p.track, pid.unwrap_or(0), p.off, p.data);
                    staged += 1;
                    continue;
                }
                direct.push(*p);
            }
            self.staged_now.store(st.len(), Ordering::Release);
            if staged > 0 {
                self.staged_total.fetch_add(staged, Ordering::Relaxed);
                if let Some(slot) = &slot {
                    slot.staged.fetch_add(staged, Ordering::Relaxed);
                }
                self.stage_cv.notify_all();
            }
        }
        // Not pending (or its bit was cleared meanwhile, so the copy holds the old
        // data durably): straight to the volume.
        for p in direct {
            self.vol.write_at(p.track * ts + p.off, p.data)?;
        }
        Ok(())
    }

    /// Staged patches of `tracks` (copies), for a read to lay over what it reads from
    /// the volume. Taken *before* the volume read: a track destaged meanwhile is on the
    /// volume by then.
    pub fn staged_of(&self, tracks: impl Iterator<Item = u64>) -> HashMap<u64, Staged> {
        let mut out = HashMap::new();
        if self.staged_now.load(Ordering::Acquire) == 0 {
            return out;
        }
        let st = self.stage_table();
        for t in tracks {
            if let Some(e) = st.get(t) {
                out.insert(t, e.clone());
            }
        }
        out
    }

    /// Patches `data` at `off` into staged track `track`; false if it is not staged
    /// (the caller writes to the volume then).
    pub fn patch_staged(&self, track: u64, off: u64, data: &[u8]) -> bool {
        if self.staged_now.load(Ordering::Acquire) == 0 {
            return false;
        }
        self.stage_table().patch(track, off, data)
    }

    /// Forgets the staged content of tracks no file maps any more (freed, or about to be
    /// mapped afresh): it must never reach a track that another file may get.
    pub fn drop_staged(&self, tracks: impl IntoIterator<Item = u64>) {
        if self.staged_now.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut st = self.stage_table();
        for t in tracks {
            st.remove(t);
        }
        self.staged_now.store(st.len(), Ordering::Release);
    }

    /// Bytes of host writes staged now.
    pub fn staged_bytes(&self) -> u64 {
        self.stage_table().bytes()
    }

    /// One destage round: for every pair with staged tracks, sync the copy image, clear
    /// and commit their pending bits (with the copier's unconfirmed tracks), then write
    /// the staged content to the volume. Everything staged before the call is on the
    /// volume (not yet synced) when it returns Ok.
    ///
    /// Lock order: takes `destage_lock`, then each pair's gate: call it with no gate,
    /// commit lock or state lock held (the barrier and a data lock may be held).
    pub fn destage(&self, ns: &dyn Namespace) -> Result<()> {
        if self.staged_now.load(Ordering::Acquire) == 0 {
            return Ok(());
        }
        let _d = self.destage_lock.lock().unwrap_or_else(|p| p.into_inner());
        let waiting = self.stage_table().take_waiting();
        let mut first_err: Option<Error> = None;
        for (pid, tracks) in waiting {
            if let Some(slot) = self.slot(pid)
                && !slot.released.load(Ordering::Acquire)
            {
                let _g = slot.gate();
                let need = slot.lock().cow_needed(&tracks);
                // The old tracks, still on the volume (their patches are not applied),
                // go to the copy image; a failed copy puts the pair in error, a failed
                // sync every pair (the pipeline calls the engine's copy-image-lost
                // hook): then no copy needs the old tracks any more.
                let copied = if need.is_empty() {
                    false
                } else if let Err(e) = self.copy_tracks(&slot, &need) {
                    self.fail(ns, &slot, &e);
                    false
                } else {
                    self.cow_total
                        .fetch_add(need.len() as u64, Ordering::Relaxed);
                    slot.cow.fetch_add(need.len() as u64, Ordering::Relaxed);
                    self.copied_total
                        .fetch_add(need.len() as u64, Ordering::Relaxed);
                    true
                };
                if copied {
                    match self.durability.sync_copy(&self.hooks(ns)) {
                        Ok(()) => {
                            let before = slot.lock().state;
                            let mut done = std::mem::take(
                                &mut *slot.unconfirmed.lock().unwrap_or_else(|p| p.into_inner()),
                            );
                            done.extend_from_slice(&need);
                            slot.lock().begin_clear(&done);
                            if let Err(e) = self.persist(&slot, false) {
                                // The bits are not durably clear: the new data must not
                                // reach the volume. The metadata store refuses every
                                // change from now on (persist poisoned it).
                                first_err.get_or_insert(e);
                                continue;
                            }
                            slot.lock().end_clear();
                            self.log_transition(&slot, before);
                        }
                        Err(e) => {
                            log::error!("pair {pid}: copy image sync failed before destaging: {e}")
                        }
                    }
                }
            }
            // Named generations: their old tracks saved (and committed) first.
            if let Err(e) = self.gen_save(ns, &tracks) {
                first_err.get_or_insert(e);
                continue;
            }
            // The old tracks are durable on the copy (or no longer needed).
            for t in tracks {
                let mut st = self.stage_table();
                if let Some(e) = st.remove(t) {
                    for (off, d) in &e.patches {
                        if let Err(err) = self.vol.write_at(t * self.track_size + off, d) {
                            first_err.get_or_insert(err);
                            break;
                        }
                    }
                }
                self.staged_now.store(st.len(), Ordering::Release);
            }
        }
        self.stage_cv.notify_all();
        first_err.map_or(Ok(()), Err)
    }

    /// The destager loop (one thread): a round whenever something is staged. Returns
    /// when the engine stops, after a last round.
    pub fn run_destager(&self, ns: &dyn Namespace) {
        loop {
            {
                let mut st = self.stage_table();
                while !st.has_waiting() && !self.stopping.load(Ordering::Acquire) {
                    st = self
                        .stage_cv
                        .wait_timeout(st, Duration::from_millis(500))
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
            let stopping = self.stopping.load(Ordering::Acquire);
            if let Err(e) = self.destage(ns) {
                log::error!("destage: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            if stopping {
                return;
            }
        }
    }

    fn log_transition(&self, slot: &Slot, before: PairState) {
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
    /// pending bits and commit. Takes the held gate as proof (core::locks).
    fn confirm(&self, ns: &dyn Namespace, slot: &Slot, _gate: &MutexGuard<'_, ()>) -> Result<()> {
        let tracks =
            std::mem::take(&mut *slot.unconfirmed.lock().unwrap_or_else(|p| p.into_inner()));
        if tracks.is_empty() {
            return Ok(());
        }
        if slot.released.load(Ordering::Acquire) {
            return Ok(());
        }
        let before = slot.lock().state;
        self.durability.sync_copy(&self.hooks(ns))?;
        slot.lock().begin_clear(&tracks);
        self.persist(slot, false)?;
        slot.lock().end_clear();
        self.log_transition(slot, before);
        Ok(())
    }

    /// One copier batch for one pair. Returns the number of tracks copied.
    fn copy_batch(&self, ns: &dyn Namespace, slot: &Slot, cursor: &mut u64) -> usize {
        let gate = slot.gate();
        if slot.released.load(Ordering::Acquire) {
            return 0;
        }
        let max = (COPY_BATCH_BYTES / self.track_size).max(1) as usize;
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
                if let Err(e) = self.confirm(ns, slot, &gate) {
                    self.fail(ns, slot, &e);
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
        match self.copy_tracks(slot, &batch) {
            Ok(()) => {
                self.copied_total
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                if frozen {
                    let n = {
                        let mut u = slot.unconfirmed.lock().unwrap_or_else(|p| p.into_inner());
                        u.extend_from_slice(&batch);
                        u.len() as u64
                    };
                    if n * self.track_size >= CONFIRM_BYTES
                        && let Err(e) = self.confirm(ns, slot, &gate)
                    {
                        self.fail(ns, slot, &e);
                        return 0;
                    }
                } else {
                    // The sums recorded for the batch go with the next commit.
                    slot.dirty.store(true, Ordering::Release);
                    self.log_transition(slot, before);
                    if slot.lock().state != before {
                        // Record the new state promptly.
                        let _ = self.persist(slot, false);
                    }
                }
                batch.len()
            }
            Err(e) => {
                self.fail(ns, slot, &e);
                0
            }
        }
    }

    /// One copier round: one batch of every pair with pending tracks, round-robin.
    /// Returns the number of tracks copied (0: nothing to do).
    pub fn copy_round(&self, ns: &dyn Namespace, cursors: &mut BTreeMap<PairId, u64>) -> usize {
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
            did += self.copy_batch(ns, &s, c);
        }
        did
    }

    /// The background copier loop: [`Engine::copy_round`] until nothing is pending,
    /// then sleep until woken. Returns when the engine stops.
    pub fn run_copier(&self, ns: &dyn Namespace) {
        let mut cursors: BTreeMap<PairId, u64> = BTreeMap::new();
        loop {
            if self.stopping.load(Ordering::Acquire) {
                for s in self.slots() {
                    let gate = s.gate();
                    if let Err(e) = self.confirm(ns, &s, &gate) {
                        log::warn!("pair {}: copies of the last round not confirmed: {e}", s.id);
                    }
                }
                return;
            }
            let seen = *self.work.lock().unwrap_or_else(|p| p.into_inner());
            if self.copy_round(ns, &mut cursors) == 0 {
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

    /// Runs a control operation on the inode `ino`. The caller (the core facade,
    /// `Fs::control`) checked that the volume is writable and holds the write barrier.
    pub fn control(
        &self,
        ns: &dyn Namespace,
        _barrier: &RwLockWriteGuard<'_, ()>,
        ino: u64,
        op: Op,
    ) -> Result<()> {
        // Staged writes are acknowledged, so they belong before the new instant.
        self.destage(ns)?;
        let existing = ns.pair_of(ino)?;
        let slot = match (existing, op) {
            (Some(id), _) => {
                let s = self
                    .slot(id)
                    .ok_or_else(|| Error::NotFound(format!("pair {id}")))?;
                let scope = s.lock().scope;
                if scope.ino() != ino {
                    if matches!(op, Op::Pair | Op::Split) && !matches!(scope, Scope::File(_)) {
                        // Third embodiment: a file of a group gets a pair of its own.
                        return self.split_off(ns, s, ino, op);
                    }
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
            (None, Op::Pair | Op::Split) => self.create(ns, ino)?,
            (None, _) => return Err(Error::invalid("no pair here (pair or split it first)")),
        };
        if op == Op::Pair {
            // The new pair (state, bitmaps, memberships) is durable before we return.
            ns.commit(Vec::new())?;
            self.wake();
            return Ok(());
        }
        self.run_locked(ns, slot, op)
    }

    /// Runs `op` on pair `id` directly, e.g. to release a pair whose file was deleted
    /// (`setfattr -n user.pairfs.release -v ID MOUNTPOINT`).
    /// As for [`Engine::control`], the caller holds the write barrier.
    pub fn control_id(
        &self,
        ns: &dyn Namespace,
        _barrier: &RwLockWriteGuard<'_, ()>,
        id: PairId,
        op: Op,
    ) -> Result<()> {
        if op == Op::Pair {
            return Err(Error::invalid("pair takes a path, not a pair id"));
        }
        self.destage(ns)?;
        let slot = self
            .slot(id)
            .ok_or_else(|| Error::NotFound(format!("pair {id}")))?;
        self.run_locked(ns, slot, op)
    }

    /// The body of a control operation; the caller holds the write barrier.
    fn run_locked(&self, ns: &dyn Namespace, slot: Arc<Slot>, op: Op) -> Result<()> {
        let scope = slot.lock().scope;
        // A writable clone reads its unwritten tracks from this frozen copy: it stays
        // until every clone is detached (`pairfs clone --detach`).
        // (A pair in `error` has lost its frozen copy already: it can go.)
        if matches!(op, Op::Update | Op::Resync | Op::Release | Op::Join)
            && slot.lock().state.is_frozen()
            && let Some(clone) = ns.clone_dependent(slot.id)?
        {
            let e = Error::Busy(format!(
                "pair {}: the clone {clone} reads from its frozen copy \
                 (detach it first: pairfs clone --detach)",
                slot.id
            ));
            log::warn!("{op:?} refused: {e}");
            return Err(e);
        }
        if op == Op::Join {
            // A release whose hand-over has a group to go to (`Namespace::hand_over`).
            let group = match scope {
                Scope::File(i) => ns.group_of(i)?,
                _ => None,
            };
            if group.is_none() {
                return Err(Error::invalid(format!(
                    "join: pair {} ({}) is not a file pair inside a directory or root pair \
                     (release it instead)",
                    slot.id,
                    slot.lock().path
                )));
            }
        }
        // Update, resync and release of the root pair rewrite or free the copy image a
        // snapshot mount may be serving: refused while one holds it.
        let copy_path = self
            .copy_path
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let _copy_lock = match (&copy_path, scope, op) {
            (Some(copy), Scope::Root, Op::Update | Op::Resync | Op::Release) => {
                match crate::store::lock::lock_copy_for_rewrite(copy) {
                    Ok(l) => Some(l),
                    Err(e) => {
                        log::warn!("pair {}: {op:?} refused: {e}", slot.id);
                        return Err(e);
                    }
                }
            }
            _ => None,
        };
        let gate = slot.gate();
        // Copies made for the current instant become durable before it changes.
        if let Err(e) = self.confirm(ns, &slot, &gate) {
            self.fail(ns, &slot, &e);
        }
        let before = slot.lock().state;
        let now = now_ns();
        let frozen_changed = match op {
            Op::Split | Op::Update if !matches!(scope, Scope::File(_)) => {
                // A lazy instant: O(1) in the scope (docs/design.md, "Lazy instants").
                let from_error = slot.lock().state == PairState::Error;
                let current = if op == Op::Update && from_error {
                    Some(ns.scope_tracks(scope, slot.id)?)
                } else {
                    None
                };
                let pins = ns.instant(scope, &mut |top, limit| {
                    let mut p = slot.lock();
                    if op == Op::Split {
                        p.split_lazy(top, limit, now)
                    } else {
                        p.update_lazy(top, limit, current.as_ref(), now)
                    }
                })?;
                self.frozen_changed();
                self.durability.clear_copy_poison();
                self.apply_pins(ns, &pins);
                true
            }
            Op::Split | Op::Update => {
                let frozen = { ns.freeze(scope, slot.id)? };
                let pins = {
                    let mut p = slot.lock();
                    if op == Op::Split {
                        p.split(frozen, now)?
                    } else {
                        p.update(frozen, now)?
                    }
                };
                self.frozen_changed();
                self.durability.clear_copy_poison();
                self.apply_pins(ns, &pins);
                true
            }
            Op::Resync => {
                let current = ns.scope_tracks(scope, slot.id)?;
                let pins = slot.lock().resync(&current, now)?;
                self.frozen_changed();
                self.durability.clear_copy_poison();
                self.apply_pins(ns, &pins);
                true
            }
            Op::Release | Op::Join => {
                slot.released.store(true, Ordering::Release);
                let pins = slot.lock().release();
                self.apply_pins(ns, &pins);
                // Give the copy image's space back: the frozen tracks and the mirror
                // of the scope's current tracks.
                let mirror = ns.scope_tracks(scope, slot.id)?;
                let mut runs: Vec<(u64, u64)> = Vec::new();
                for t in pins.unpin.union(&mirror).iter() {
                    match runs.last_mut() {
                        Some((s, l)) if *s + *l == t => *l += 1,
                        _ => runs.push((t, 1)),
                    }
                }
                for (t, n) in runs {
                    if let Err(e) = self.copy.discard(t * self.track_size, n * self.track_size) {
                        log::warn!("pair {}: could not release copy-image space: {e}", slot.id);
                        break;
                    }
                }
                // The members, before the pair goes (loading its scope, as the mirror
                // above did): they join the enclosing pair, if any.
                let members = ns.members_of(scope, slot.id)?;
                // Out of the engine first (under the state lock), so that no inode
                // loaded from now on finds this pair; then out of the cached ones.
                ns.forget_pair(slot.id, &mut || {
                    self.pairs
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&slot.id);
                });
                // Its named generations go with it.
                let mut deltas = self.drop_gens_of(ns, slot.id)?;
                self.frozen_changed();
                ns.hand_over(slot.id, &members)?;
                deltas.push(PairDelta {
                    id: slot.id,
                    delete: true,
                    ..PairDelta::default()
                });
                ns.commit_destaged(deltas)?;
                log::info!(
                    "pair {} ({}): {} -> {}",
                    slot.id,
                    slot.lock().path,
                    before.name(),
                    if op == Op::Join {
                        "joined its group"
                    } else {
                        "released"
                    }
                );
                return Ok(());
            }
            Op::Pair => unreachable!("handled above"),
        };
        slot.dirty.store(true, Ordering::Release);
        let frozen = frozen_changed.then(|| slot.lock().frozen.clone());
        // The flush barrier: both images synced, then the frozen map, pins and bitmaps
        // committed in one transaction.
        ns.commit_destaged(vec![PairDelta {
            id: slot.id,
            frozen,
            ..PairDelta::default()
        }])?;
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

    /// The copy image moved (`pairfs migrate --copy-image`): snapshot mounts now lock
    /// `path`.
    pub fn set_copy_lock_path(&self, path: PathBuf) {
        *self.copy_path.lock().unwrap_or_else(|p| p.into_inner()) = Some(path);
    }

    /// Third embodiment ([`crate::snap::group`]): regular file `ino`, a member of the
    /// directory or root pair `group`, gets a pair of its own: forming for
    /// [`Op::Pair`], split at once for [`Op::Split`]. The namespace freezes the file in
    /// the group's instant if it had not, moves the tracks a frozen copy pins, drops
    /// the file's tracks from the group's bitmaps and registers the new pair; all of it
    /// reaches the database in one transaction (commits are held off meanwhile, so no
    /// commit carries a part of it). The caller holds the write barrier.
    fn split_off(&self, ns: &dyn Namespace, group: Arc<Slot>, ino: u64, op: Op) -> Result<()> {
        if self.has_gens(group.id) {
            return Err(Error::Busy(format!(
                "pair {} has named generations: a file inside it cannot be split on its own \
                 (release them first)",
                group.id
            )));
        }
        // No copy of the group's in flight while its bits of the file are dropped.
        let _group_gate = group.gate();
        let now = now_ns();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed).max(1);
        let slot = Arc::new(Slot::new(Pair::new(
            id,
            Scope::File(ino),
            String::new(),
            TrackSet::new(),
            now,
        )));
        // Taken before the pair is registered: the copier finds it only after the commit.
        let _gate = slot.gate();
        {
            let _hold = self.durability.hold_commits();
            ns.split_off(ino, group.id, &mut |scope, path, current| {
                *slot.lock() = Pair::new(id, scope, path.to_string(), current, now);
                self.pairs
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(id, slot.clone());
                id
            })?;
            if op == Op::Split {
                let frozen = ns.freeze(Scope::File(ino), id)?;
                let pins = {
                    let mut p = slot.lock();
                    let pins = p.split(frozen, now)?;
                    // The frozen map rides as appended records with the pair's first
                    // row, in whichever commit comes first.
                    p.frozen_saved = 0;
                    pins
                };
                self.apply_pins(ns, &pins);
                self.frozen_changed();
            }
            slot.dirty.store(true, Ordering::Release);
            group.dirty.store(true, Ordering::Release);
        }
        ns.commit_destaged(Vec::new())?;
        let (path, state) = {
            let p = slot.lock();
            (p.path.clone(), p.state)
        };
        log::info!(
            "pair {id} ({path}): split off pair {} on its own, {}",
            group.id,
            state.name()
        );
        self.wake();
        Ok(())
    }

    fn create(&self, ns: &dyn Namespace, ino: u64) -> Result<Arc<Slot>> {
        let mut made = None;
        // The namespace marks the members and calls back, under its lock, to register
        // the pair: a member evicted and loaded again finds its pair through the engine.
        ns.claim(ino, &mut |scope, path, current| {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed).max(1);
            let p = Pair::new(id, scope, path.to_string(), current, now_ns());
            let slot = Arc::new(Slot::new(p));
            self.pairs
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, slot.clone());
            made = Some((slot, scope, path.to_string()));
            id
        })?;
        let (slot, scope, path) = made.ok_or_else(|| Error::invalid("nothing to pair"))?;
        log::info!(
            "pair {} ({path}): created, forming ({})",
            slot.id,
            scope.kind()
        );
        Ok(slot)
    }

    /// Status of the pair that holds `ino` (None if unpaired).
    pub fn status_of(&self, ns: &dyn Namespace, ino: u64) -> Result<Option<PairStatus>> {
        let Some(id) = ns.pair_of(ino)? else {
            return Ok(None);
        };
        Ok(self.slot(id).map(|s| self.status(ns, &s)))
    }

    /// Status of every pair.
    pub fn all_status(&self, ns: &dyn Namespace) -> Vec<PairStatus> {
        self.slots().iter().map(|s| self.status(ns, s)).collect()
    }

    fn status(&self, ns: &dyn Namespace, s: &Slot) -> PairStatus {
        // The namespace comes before pair state (core::locks): count pinned tracks first.
        let pinned = s.lock().pinned_tracks();
        let pinned_only = ns.unused_count(&pinned);
        let p = s.lock();
        let dirty = match p.state {
            PairState::Updating => p.update_diff.count(),
            PairState::Splitting | PairState::Split => p.split_diff.count(),
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
            pinned_bytes: pinned_only * self.track_size,
            files: p
                .frozen
                .iter()
                .filter(|f| !f.absent && f.attr.kind == FrozenKind::File)
                .count(),
            error: p.error.clone(),
            track_size: self.track_size,
            staged: s.staged.load(Ordering::Relaxed),
            cow: s.cow.load(Ordering::Relaxed),
            sum_errors: s.sum_errors.load(Ordering::Relaxed),
        }
    }

    /// Records that the set of frozen objects changed: the next [`Engine::view`]
    /// rebuilds the view.
    pub fn frozen_changed(&self) {
        let g = self.view_gen.fetch_add(1, Ordering::AcqRel) + 1;
        self.view_watchers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|w| w.send(g).is_ok());
    }

    /// A channel that receives the new generation after every change of the frozen set.
    pub fn watch_view(&self) -> std::sync::mpsc::Receiver<u64> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.view_watchers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(tx);
        rx
    }

    /// True while `v` is the view of the current frozen set (no split, update, resync,
    /// release or error since it was built).
    pub fn view_is_current(&self, v: &FrozenView) -> bool {
        v.generation() == self.view_gen.load(Ordering::Acquire)
    }

    /// What identifies the frozen set: every frozen pair's id and instant, every named
    /// generation's id and instant. Two engines loaded from committed states of one
    /// volume with equal identities serve the same view: the instants are the same
    /// (a split, update, resync, release or error changes the identity), and only
    /// where their data lies may differ, which reads resolve when they run.
    pub fn frozen_identity(&self) -> Vec<(PairId, i64)> {
        self.instants()
            .into_iter()
            .map(|(id, t, _)| (id, t))
            .collect()
    }

    /// [`Engine::frozen_identity`] with each part's instant number
    /// ([`crate::snap::pair::Pair::instant`]).
    fn instants(&self) -> Vec<(PairId, i64, u64)> {
        let mut v: Vec<(PairId, i64, u64)> = self
            .slots()
            .iter()
            .filter_map(|s| {
                let p = s.lock();
                p.state.is_frozen().then_some((p.id, p.split_ns, p.instant))
            })
            .collect();
        v.extend(self.gen_identity());
        v.sort_unstable();
        v
    }

    /// Takes over what `old`, an engine of an earlier committed state of the same
    /// volume, built of the view: its inode numbering always (a path keeps its
    /// copy-mount inode number, so the kernel's cached numbers stay right); the object
    /// lists of every lazy pair and generation whose instant (id and split time) is the
    /// same here, so a rebuild walks only the others; and its current view too when
    /// `same_set` (equal [`Engine::frozen_identity`]), so nothing is built again. Used by
    /// a copy mount that follows a volume another process writes (`pairfs replica serve
    /// --copy-mount`).
    pub fn adopt_view(&self, old: &Engine, same_set: bool) {
        let (was, now) = (old.instants(), self.instants());
        let numbering = old
            .view_numbering
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let parts = old
            .view_parts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .carry(|id, instant| {
                let w = was.iter().find(|x| x.0 == id)?;
                let n = now.iter().find(|x| x.0 == id)?;
                (w.2 == instant && w.1 == n.1).then_some(n.2)
            });
        *self
            .view_numbering
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = numbering;
        *self.view_parts.lock().unwrap_or_else(|p| p.into_inner()) = parts;
        if !same_set {
            return;
        }
        let v = old.view.read().unwrap_or_else(|p| p.into_inner()).clone();
        if old.view_is_current(&v) && !v.is_empty() {
            let mut mine = self.view.write().unwrap_or_else(|p| p.into_inner());
            self.view_gen.store(v.generation(), Ordering::Release);
            *mine = v;
        }
    }

    /// The frozen view of every pair in a frozen state (what the copy mount serves).
    /// Built once per change of the frozen set; callers share it. A rebuild walks only
    /// the lazy pairs and generations whose instant changed since the last one; the
    /// others' objects are kept ([`PartCache`]).
    pub fn view(&self, ns: &dyn Namespace, ts: u64) -> Arc<FrozenView> {
        let current = |g: u64| {
            let v = self.view.read().unwrap_or_else(|p| p.into_inner());
            (v.generation() == g && !v.is_empty()).then(|| v.clone())
        };
        if let Some(v) = current(self.view_gen.load(Ordering::Acquire)) {
            return v;
        }
        let mut numbering = self
            .view_numbering
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // Read the generation before the pairs: a change during the build bumps it
        // again, and the next call rebuilds.
        let g = self.view_gen.load(Ordering::Acquire);
        if let Some(v) = current(g) {
            return v;
        }
        let mut parts = self.view_parts.lock().unwrap_or_else(|p| p.into_inner());
        let mut b = Builder::new(g, ts, &mut numbering);
        // Directory and root pairs first, then file pairs: a file split on its own
        // inside a group is (also) served aside (`Builder::add_file_pair`).
        let mut slots = self.slots();
        slots.sort_by_key(|s| (matches!(s.lock().scope, Scope::File(_)), s.id));
        for s in slots {
            let p = s.lock();
            if !p.state.is_frozen() {
                continue;
            }
            if let Scope::File(ino) = p.scope {
                let (id, frozen) = (p.id, p.frozen.clone());
                drop(p);
                // Namespace lock after the pair's state lock is dropped (lock order).
                let in_group = ns.group_of(ino).ok().flatten().is_some();
                b.add_file_pair(id, &frozen, in_group);
                continue;
            }
            if p.lazy.is_none() {
                b.add_pair(p.id, &p.frozen);
                continue;
            }
            // Read with the state: a walk that a new instant overtakes is kept under the
            // old number, which never comes back.
            let instant = p.instant;
            drop(p);
            match parts.get_or_walk(s.id, instant, || self.lazy_objects(ns, &s)) {
                Ok(objects) => b.add_pair(s.id, &objects),
                Err(e) => log::warn!("pair {}: frozen view incomplete: {e}", s.id),
            }
        }
        self.gen_view(ns, &mut b, &mut parts);
        parts.end_rebuild();
        drop(parts);
        let v = Arc::new(b.finish());
        *self.view.write().unwrap_or_else(|p| p.into_inner()) = v.clone();
        v
    }

    /// Whole walks of a lazy pair's or a generation's instant that [`Engine::view`] made
    /// since mount (tests and measurements: a rebuild walks only what changed).
    pub fn view_walks(&self) -> u64 {
        let _n = self
            .view_numbering
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        self.view_parts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .walks()
    }

    /// Drops the view's kept object lists and marks the view behind, so the next
    /// [`Engine::view`] is built from scratch (tests compare the two builds).
    pub fn forget_view_parts(&self) {
        {
            let _n = self
                .view_numbering
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            self.view_parts
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
        }
        self.frozen_changed();
    }

    /// The byte ranges of file `ino` (extents `now`, size `size` now) changed since the
    /// instant of pair `id`'s frozen copy ([`crate::snap::diff`]). Refused (EINVAL)
    /// when the pair has no frozen copy.
    pub fn diff(
        &self,
        id: PairId,
        ino: u64,
        now: &crate::core::extent::ExtentMap,
        size: u64,
    ) -> Result<crate::snap::diff::FileDiff> {
        let slot = self
            .slot(id)
            .ok_or_else(|| Error::NotFound(format!("pair {id}")))?;
        let p = slot.lock();
        // The record bitmap: host writes since the current instant.
        let record = match p.state {
            PairState::Splitting | PairState::Split => &p.split_diff,
            PairState::Updating => &p.update_diff,
            s => {
                return Err(Error::invalid(format!(
                    "diff: pair {id} ({}) is {}: no frozen copy to compare with (split it first)",
                    p.path,
                    s.name()
                )));
            }
        };
        Ok(self.diff_with(id, &p, record, ino, now, size))
    }

    /// The changed ranges of file `ino` against the instant whose records `p` holds,
    /// `record` the volume tracks written since (a pair's record bitmap, or the tracks a
    /// named generation saved).
    fn diff_with(
        &self,
        id: PairId,
        p: &Pair,
        record: &TrackSet,
        ino: u64,
        now: &crate::core::extent::ExtentMap,
        size: u64,
    ) -> crate::snap::diff::FileDiff {
        // The file at the instant: its frozen record; for a lazy pair an inode that
        // existed then and has no record has not changed since (any change freezes it
        // first), so it is compared with itself; an absent marker or a newer inode had
        // no instant state (all of it is changed).
        let then = match p.frozen_of(ino) {
            Some(f) if !f.absent && f.attr.kind == FrozenKind::File => {
                Some((&f.extents, f.attr.size))
            }
            Some(_) => None,
            None if p.lazy.is_some_and(|l| ino < l) => Some((now, size)),
            None => p
                .frozen
                .iter()
                .find(|f| f.ino == ino && f.attr.kind == FrozenKind::File && !f.absent)
                .map(|f| (&f.extents, f.attr.size)),
        };
        crate::snap::diff::FileDiff {
            pair: id,
            state: p.state.name().to_string(),
            size,
            old_size: then.map_or(0, |t| t.1),
            track_size: self.track_size,
            ranges: crate::snap::diff::changed_ranges(self.track_size, now, size, then, record),
        }
    }

    /// Every object of a lazy pair's instant: its frozen records placed by their paths
    /// plus the unchanged members found by walking the live tree from the frozen
    /// directories, one directory per hold of the namespace lock
    /// ([`crate::snap::view::lazy_objects`]). No pair lock is held across a namespace
    /// call (the namespace comes first in the lock order).
    fn lazy_objects(&self, ns: &dyn Namespace, s: &Slot) -> Result<Vec<Frozen>> {
        let id = s.id;
        crate::snap::view::lazy_objects(
            |from| {
                let p = s.lock();
                if !p.state.is_frozen() || p.lazy.is_none() {
                    return Err(Error::NotFound("the frozen copy is gone".into()));
                }
                Ok(p.frozen
                    .get(from..)
                    .map(<[Frozen]>::to_vec)
                    .unwrap_or_default())
            },
            |dir, after| ns.instant_children(id, dir, after),
        )
    }

    /// The names in the frozen view's root directory, without building the view: the
    /// first component of every frozen record's path, and for a lazy root pair the
    /// unchanged names in the root too (one directory listed). A copy mount drops the
    /// kernel's cached names of the old and the new instant with them after a change.
    pub fn top_names(&self, ns: &dyn Namespace) -> Vec<Vec<u8>> {
        let mut out: Vec<Vec<u8>> = Vec::new();
        for s in self.slots() {
            let (lazy_root, firsts) = {
                let p = s.lock();
                if !p.state.is_frozen() {
                    continue;
                }
                let firsts: Vec<Vec<u8>> = p
                    .frozen
                    .iter()
                    .filter(|f| !f.absent)
                    .flat_map(|f| std::iter::once(&f.path).chain(f.links.iter()))
                    .filter_map(|path| path.split('/').next())
                    .filter(|n| !n.is_empty())
                    .map(|n| n.as_bytes().to_vec())
                    .collect();
                // A lazy pair's first record is its top (the root for a root pair).
                let lazy_root = (p.lazy.is_some() && p.scope == Scope::Root)
                    .then(|| p.frozen.first().map(|f| f.ino))
                    .flatten();
                (lazy_root, firsts)
            };
            out.extend(firsts);
            if matches!(s.lock().scope, Scope::File(_)) {
                // Where a file pair's object goes when its path is taken.
                out.push(crate::snap::view::ASIDE_DIR.as_bytes().to_vec());
            }
            if let Some(root) = lazy_root {
                let mut after = None;
                while let Ok(Some((batch, next))) = ns.instant_children(s.id, root, after.take()) {
                    out.extend(batch.into_iter().map(|(n, _)| n));
                    match next {
                        Some(c) => after = Some(c),
                        None => break,
                    }
                }
            }
        }
        out.extend(self.gen_top_names());
        out.sort();
        out.dedup();
        out
    }

    /// A copy of every frozen object: (pair id, index, object). For tests and checks;
    /// the copy mount serves [`Engine::view`], which copies nothing per request. A lazy
    /// pair's objects are indexed in the list this returns; read them by inode
    /// ([`Engine::read_frozen_of`] with `Some(ino)`).
    pub fn frozen_objects(&self, ns: &dyn Namespace) -> Vec<(PairId, usize, Frozen)> {
        let mut out = Vec::new();
        for s in self.slots() {
            let p = s.lock();
            if !p.state.is_frozen() {
                continue;
            }
            let objects = if p.lazy.is_some() {
                drop(p);
                self.lazy_objects(ns, &s).unwrap_or_default()
            } else {
                p.frozen.clone()
            };
            for (i, f) in objects.into_iter().enumerate() {
                out.push((s.id, i, f));
            }
        }
        for (id, objects) in self.gen_objects(ns) {
            for (i, f) in objects.into_iter().enumerate() {
                out.push((id, i, f));
            }
        }
        out
    }

    /// True if pair `id` exists and has a frozen copy (splitting, split, updating).
    pub fn is_frozen(&self, id: PairId) -> bool {
        self.slot(id).is_some_and(|s| s.lock().state.is_frozen())
    }

    /// Reads frozen file `ino` (its main inode) of pair `id` as of its instant: what a
    /// writable clone reads from its backing ([`crate::core::clone`]).
    pub fn read_frozen_ino(
        &self,
        ns: &dyn Namespace,
        id: PairId,
        ino: u64,
        off: u64,
        size: u32,
    ) -> Result<Vec<u8>> {
        let slot = self
            .slot(id)
            .ok_or_else(|| backing_gone(format!("the frozen copy of pair {id} is gone")))?;
        let idx = {
            let p = slot.lock();
            if p.lazy.is_some() {
                0
            } else {
                p.frozen_at
                    .get(&ino)
                    .copied()
                    .filter(|&k| !p.frozen[k].absent)
                    .ok_or_else(|| {
                        backing_gone(format!("pair {id}: frozen file of inode {ino} is gone"))
                    })?
            }
        };
        self.read_frozen_of(ns, (id, idx, Some(ino)), off, size)
            .map_err(|e| match e {
                Error::NotFound(m) => backing_gone(format!("pair {id}: {m}")),
                e => e,
            })
    }

    /// Reads frozen file `idx` of pair `id` as of its split instant.
    pub fn read_frozen(
        &self,
        ns: &dyn Namespace,
        id: PairId,
        idx: usize,
        off: u64,
        size: u32,
    ) -> Result<Vec<u8>> {
        // A lazy pair's objects are numbered in `frozen_objects`' list (tests and
        // checks only: this walks the instant).
        let ino = match self.slot(id) {
            Some(s) if s.lock().lazy.is_some() => {
                self.lazy_objects(ns, &s)?.get(idx).map(|f| f.ino)
            }
            _ => self.gen_lazy_ino(ns, id, idx)?,
        };
        self.read_frozen_of(ns, (id, idx, ino), off, size)
    }

    /// [`Engine::read_frozen`], refusing (ESTALE) when the object at `idx` is no longer
    /// inode `ino` (an update reordered the frozen list since the caller looked it up).
    pub fn read_frozen_of(
        &self,
        ns: &dyn Namespace,
        (id, idx, ino): (PairId, usize, Option<u64>),
        off: u64,
        size: u32,
    ) -> Result<Vec<u8>> {
        // A pair's frozen copy, or a named generation's (`gen`).
        let named = self.gen_slot(id);
        let slot = match &named {
            Some(_) => None,
            None => Some(
                self.slot(id)
                    .ok_or_else(|| Error::NotFound(format!("pair {id}")))?,
            ),
        };
        let with_pair = |f: &mut dyn FnMut(&Pair)| match (&named, &slot) {
            (Some(g), _) => f(&g.lock().p),
            (None, Some(s)) => f(&s.lock()),
            (None, None) => {}
        };
        let ts = self.track_size;
        let mut lazy = None;
        with_pair(&mut |p| {
            lazy = p.state.is_frozen().then_some(p.lazy.is_some());
        });
        let lazy = lazy.ok_or_else(|| Error::NotFound("the frozen copy is gone".into()))?;
        let (segs, len, path) = if lazy {
            // A lazy pair: the instant's record if the file changed since, else its
            // live (unchanged) map, both under the namespace lock.
            let ino = ino.ok_or_else(|| Error::NotFound("frozen file".into()))?;
            if size == 0 {
                return Ok(Vec::new());
            }
            // The segments of the range asked (clipped to the instant's size below:
            // segments past it are skipped), not a copy of the whole map.
            let f0 = off / ts;
            let f1 = (off + size as u64 - 1) / ts;
            let (size_at, segs) = ns.instant_file(id, ino, f0, f1 - f0 + 1)?;
            if off >= size_at {
                return Ok(Vec::new());
            }
            let len = (size as u64).min(size_at - off);
            // For log lines: the record's path when the file changed since the instant.
            let mut path = format!("(inode {ino})");
            with_pair(&mut |p| {
                if let Some(f) = p.frozen_of(ino) {
                    path = f.path.clone();
                }
            });
            (segs, len, path)
        } else {
            let mut found: Result<Option<(Vec<Segment>, u64, String)>> =
                Err(Error::NotFound("frozen file".into()));
            with_pair(&mut |p| {
                found = match p.frozen.get(idx) {
                    None => Err(Error::NotFound("frozen file".into())),
                    Some(f) if ino.is_some_and(|i| i != f.ino) => Err(Error::Stale),
                    Some(f) if off >= f.attr.size => Ok(None),
                    Some(f) => {
                        let len = (size as u64).min(f.attr.size - off);
                        let f0 = off / ts;
                        let f1 = (off + len - 1) / ts;
                        Ok(Some((
                            f.extents.segments(f0, f1 - f0 + 1),
                            len,
                            f.path.clone(),
                        )))
                    }
                };
            });
            match found? {
                Some(x) => x,
                None => return Ok(Vec::new()),
            }
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
                let at = (id, path.as_str(), ft, v, a - ft * ts);
                let Some(slot) = &slot else {
                    if let Some(g) = &named {
                        self.gen_read_track(g, (path.as_str(), ft, v, a - ft * ts), dst)?;
                    }
                    continue;
                };
                if slot.lock().read_from_volume(v) {
                    self.vol.read_at(voff, dst)?;
                    // A copy-on-write may have finished (and the host overwritten the
                    // track) while we read: then the copy image has the frozen data.
                    if !slot.lock().read_from_volume(v) {
                        self.read_copy(at, dst)?;
                    }
                } else {
                    self.read_copy(at, dst)?;
                }
            }
        }
        Ok(buf)
    }
}

impl Engine {
    /// Reads `dst` at offset `in_off` of copy-image track `v` (file track `ft` of frozen
    /// file `path` of pair `id`), verifying the whole track's checksum unless the
    /// verified-track cache says it matched this sum already. A mismatch is EIO and a log
    /// line; a track without a sum (copied before checksums) is read unverified.
    fn read_copy(
        &self,
        (id, path, ft, v, in_off): (PairId, &str, u64, u64, u64),
        dst: &mut [u8],
    ) -> Result<()> {
        let ts = self.track_size;
        let Some(mut want) = self.sum_of(v) else {
            return self.copy.read_at(v * ts + in_off, dst);
        };
        if self.verify_cache
            && self
                .verified
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&v)
                == Some(&want)
        {
            return self.copy.read_at(v * ts + in_off, dst);
        }
        // A read of the whole track verifies in the caller's buffer (no second copy).
        let whole = in_off == 0 && dst.len() as u64 == ts;
        let mut own = Vec::new();
        if !whole {
            own.resize(ts as usize, 0);
        }
        let tb: &mut [u8] = if whole { &mut *dst } else { &mut own };
        self.copy.read_at(v * ts, tb)?;
        let mut got = crate::snap::sums::crc(tb);
        if got != want {
            // A copy may have rewritten the track (and its sum) meanwhile: look once more.
            want = self.sum_of(v).unwrap_or(want);
            self.copy.read_at(v * ts, tb)?;
            got = crate::snap::sums::crc(tb);
        }
        if got != want {
            self.sum_errors.fetch_add(1, Ordering::Relaxed);
            if let Some(s) = self.slot(id) {
                s.sum_errors.fetch_add(1, Ordering::Relaxed);
            }
            log::error!(
                "pair {id}: frozen file {path}: file track {ft} (copy-image track {v}) fails \
                 its checksum (crc32c {got:08x}, stored {want:08x}): read refused (EIO); \
                 run `pairfs scrub`"
            );
            return Err(Error::io(
                "copy image",
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("checksum mismatch in copy-image track {v}"),
                ),
            ));
        }
        if self.verify_cache {
            let mut c = self.verified.lock().unwrap_or_else(|p| p.into_inner());
            if c.len() >= VERIFIED_MAX {
                c.clear();
            }
            c.insert(v, want);
        }
        if !whole {
            dst.copy_from_slice(&own[in_off as usize..in_off as usize + dst.len()]);
        }
        Ok(())
    }

    /// Checks every copied track of every frozen copy against its checksum (`pairfs
    /// scrub`): the tracks of frozen files whose pending bits are clear, read from the
    /// copy image. Takes no gate (reads only); a track recopied meanwhile is rechecked
    /// with its new sum.
    pub fn scrub(&self, ns: &dyn Namespace) -> Result<ScrubReport> {
        let mut files = Vec::new();
        for s in self.slots() {
            let lazy = {
                let p = s.lock();
                p.state.is_frozen() && p.lazy.is_some()
            };
            if lazy {
                // A lazy instant's files: its records plus the unchanged live files.
                let objects = self.lazy_objects(ns, &s)?;
                files.extend(crate::snap::sums::files_in(s.id, &objects));
            } else {
                files.extend(crate::snap::sums::files_of(&s.lock()));
            }
        }
        files.extend(self.gen_scrub_files());
        let ts = self.track_size;
        crate::snap::sums::scrub(
            files,
            ts,
            &|id, v| {
                self.gen_slot(id).is_some()
                    || self.slot(id).is_some_and(|s| !s.lock().read_from_volume(v))
            },
            &|t| self.sum_of(t),
            &|off, b| self.copy.read_at(off, b),
        )
    }
}

/// The engine seen by the durability pipeline ([`PairHooks`]).
pub struct Hooks<'a> {
    engine: &'a Engine,
    ns: &'a dyn Namespace,
}

impl PairHooks for Hooks<'_> {
    fn take(&self, meta: &MutexGuard<'_, Meta>) -> Vec<PairDelta> {
        self.engine.take_dirty_pairs(meta)
    }
    fn restore(&self, deltas: &[PairDelta]) {
        self.engine.restore_deltas(deltas);
    }
    fn copy_image_lost(&self, e: &Error) {
        self.engine.fail_all(self.ns, e);
    }
}
