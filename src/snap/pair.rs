//! The pair state machine and its three bitmaps (seed 004, first embodiment). Pure:
//! no I/O, no locks; the engine ([`crate::snap::engine`]) drives it and does the copying.
//!
//! ```text
//!   pair ──► forming ──(copied)──► formed ──split──► splitting ──(copied)──► split
//!               ▲                                                    │  ▲
//!               └───────── formed ◄──(copied)── resyncing ◄─resync──┘  │ (copied: split-diff := update-diff)
//!                                                          update ──► updating
//!   release: from any state.   error: a failed copy; update or resync recovers.
//! ```
//!
//! Bitmaps are indexed by *volume track* ([`TrackSet`]):
//! - **forming-diff**: tracks whose copy is stale while forming/formed/resyncing, and
//!   the tracks still to copy at the split instant (the *pending* set of `splitting`);
//! - **split-diff**: tracks written since the split; the pending set of `updating`;
//! - **update-diff**: tracks written while updating; becomes split-diff at the end.
//!
//! The rule that makes the frozen copy exact: in `splitting` and `updating`, a host
//! write to a track whose pending bit is set must first copy the old track to the copy
//! image and clear the bit *durably* ([`Pair::cow_needed`] says which tracks), then
//! write. A frozen file reads a track from the volume while its pending bit is set (the
//! volume still holds the split-time data) and from the copy image once it is clear.

use std::collections::HashMap;

use crate::core::extent::ExtentMap;
use crate::core::trackset::TrackSet;
use crate::error::{Error, Result};

/// Pair identifier.
pub type PairId = u64;

/// What a pair covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// One regular file.
    File(u64),
    /// Every regular file beneath a directory (a consistency group).
    Dir(u64),
    /// The whole volume.
    Root,
}

impl Scope {
    /// Kind name for display and storage.
    pub fn kind(&self) -> &'static str {
        match self {
            Scope::File(_) => "file",
            Scope::Dir(_) => "dir",
            Scope::Root => "root",
        }
    }
    /// The inode at the top of the scope.
    pub fn ino(&self) -> u64 {
        match *self {
            Scope::File(i) | Scope::Dir(i) => i,
            Scope::Root => 1,
        }
    }
    /// Specificity for membership claims: file before directory before root.
    pub fn rank(&self) -> u8 {
        match self {
            Scope::File(_) => 0,
            Scope::Dir(_) => 1,
            Scope::Root => 2,
        }
    }
}

/// Pair states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairState {
    /// Initial copy running.
    Forming,
    /// Copy mirrors the volume (writes are tracked in forming-diff).
    Formed,
    /// Frozen; tracks still to copy.
    Splitting,
    /// Frozen and complete.
    Split,
    /// Frozen copy being refreshed to the update instant.
    Updating,
    /// Leaving the frozen state; back to formed when copied.
    Resyncing,
    /// A copy failed; the frozen copy is not offered. Update or resync recovers.
    Error,
}

impl PairState {
    /// The word `user.pairfs.state` starts with.
    pub fn name(&self) -> &'static str {
        match self {
            PairState::Forming => "forming",
            PairState::Formed => "formed",
            PairState::Splitting => "splitting",
            PairState::Split => "split",
            PairState::Updating => "updating",
            PairState::Resyncing => "resyncing",
            PairState::Error => "error",
        }
    }

    /// Parses [`PairState::name`].
    pub fn parse(s: &str) -> Option<PairState> {
        Some(match s {
            "forming" => PairState::Forming,
            "formed" => PairState::Formed,
            "splitting" => PairState::Splitting,
            "split" => PairState::Split,
            "updating" => PairState::Updating,
            "resyncing" => PairState::Resyncing,
            "error" => PairState::Error,
            _ => return None,
        })
    }

    /// True while a frozen copy exists and is offered.
    pub fn is_frozen(&self) -> bool {
        matches!(
            self,
            PairState::Splitting | PairState::Split | PairState::Updating
        )
    }

    /// True while the copier has work for this state.
    pub fn is_copying(&self) -> bool {
        matches!(
            self,
            PairState::Forming | PairState::Splitting | PairState::Updating | PairState::Resyncing
        )
    }
}

/// Kind of a frozen object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FrozenKind {
    /// Regular file (has an extent map).
    #[default]
    File,
    /// Directory.
    Dir,
    /// Symbolic link.
    Symlink,
    /// Named pipe.
    Fifo,
    /// Unix socket.
    Socket,
    /// Character device (`rdev`).
    CharDev,
    /// Block device (`rdev`).
    BlockDev,
}

impl FrozenKind {
    /// The kind of an `S_IFMT` value.
    pub fn from_mode(fmt: u32) -> Option<FrozenKind> {
        Some(match fmt {
            libc::S_IFREG => FrozenKind::File,
            libc::S_IFDIR => FrozenKind::Dir,
            libc::S_IFLNK => FrozenKind::Symlink,
            libc::S_IFIFO => FrozenKind::Fifo,
            libc::S_IFSOCK => FrozenKind::Socket,
            libc::S_IFCHR => FrozenKind::CharDev,
            libc::S_IFBLK => FrozenKind::BlockDev,
            _ => return None,
        })
    }

    /// The number stored in the `frozen.kind` column.
    pub fn code(self) -> u8 {
        match self {
            FrozenKind::File => 0,
            FrozenKind::Dir => 1,
            FrozenKind::Symlink => 2,
            FrozenKind::Fifo => 3,
            FrozenKind::Socket => 4,
            FrozenKind::CharDev => 5,
            FrozenKind::BlockDev => 6,
        }
    }

    /// Inverse of [`FrozenKind::code`].
    pub fn from_code(c: u8) -> Option<FrozenKind> {
        [
            FrozenKind::File,
            FrozenKind::Dir,
            FrozenKind::Symlink,
            FrozenKind::Fifo,
            FrozenKind::Socket,
            FrozenKind::CharDev,
            FrozenKind::BlockDev,
        ]
        .get(c as usize)
        .copied()
    }
}

/// Split-time attributes of a frozen object.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FrozenAttr {
    /// Kind.
    pub kind: FrozenKind,
    /// Permission bits (07777).
    pub perm: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size in bytes.
    pub size: u64,
    /// Access time (ns since the epoch).
    pub atime: i64,
    /// Modification time (ns).
    pub mtime: i64,
    /// Change time (ns).
    pub ctime: i64,
    /// Device number (device nodes).
    pub rdev: u32,
}

/// One object of a frozen copy, at its split-time path (relative to the copy mount).
/// A hard-linked file is one object with several names (`path` and `links`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Frozen {
    /// Inode on the main volume.
    pub ino: u64,
    /// Relative path (`a/b/c`), no leading slash; empty for the scope's top directory.
    pub path: String,
    /// Attributes at the split instant.
    pub attr: FrozenAttr,
    /// Extents at the split instant (regular files).
    pub extents: ExtentMap,
    /// Symlink target.
    pub target: Vec<u8>,
    /// The other names of a hard-linked object inside the scope (paths like `path`).
    pub links: Vec<String>,
    /// Extended attributes at the split instant (internal `user.pairfs.*` left out).
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// A lazy pair's marker for an inode that was *not* part of the scope at the instant
    /// but joined it since without a change of its own (a directory's subtree moved in,
    /// a file whose own pair was released): the frozen view leaves it out. No path,
    /// attributes or extents.
    pub absent: bool,
}

impl Frozen {
    /// The marker of an inode that was not in the scope at the instant.
    pub fn absent(ino: u64) -> Frozen {
        Frozen {
            ino,
            absent: true,
            ..Frozen::default()
        }
    }
}

/// Progress counters of the current copy operation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Tracks to copy when the operation started.
    pub total: u64,
    /// Tracks copied so far by the copier or by copy-on-write.
    pub copied: u64,
    /// Tracks copied by the last finished operation.
    pub last_copied: u64,
    /// Wall time (ns) when the operation started.
    pub started_ns: i64,
}

/// One pair.
#[derive(Debug, Clone)]
pub struct Pair {
    /// Identifier.
    pub id: PairId,
    /// What it covers.
    pub scope: Scope,
    /// Path of the scope when the pair was made (display).
    pub path: String,
    /// State.
    pub state: PairState,
    /// Forming-diff bitmap.
    pub forming: TrackSet,
    /// Split-diff bitmap.
    pub split_diff: TrackSet,
    /// Update-diff bitmap.
    pub update_diff: TrackSet,
    /// The frozen copy (empty unless frozen). For a lazy pair: the scope's top and the
    /// objects changed since the instant, as they were at the instant (see `lazy`).
    pub frozen: Vec<Frozen>,
    /// `Some(limit)`: the instant is *lazy* (directory and root pairs, schema 4): the
    /// frozen map holds only the scope's top and the objects that changed since the
    /// instant, each frozen just before its first change (`docs/design.md`, "Lazy
    /// instants"); every other member numbered below `limit` (the next inode number at
    /// the instant) is unchanged, so its live state is its instant state.
    pub lazy: Option<u64>,
    /// Index of `frozen` by inode.
    pub frozen_at: HashMap<u64, usize>,
    /// Entries of `frozen` from this index on are not in the database yet: the next
    /// commit appends them (a lazy freeze rides in the commit of the change it precedes).
    pub frozen_saved: usize,
    /// Time of the split/update instant (ns).
    pub split_ns: i64,
    /// Which frozen map this is, in memory: a number unique in the process, new at every
    /// [`Pair::set_frozen`] (split, update, resync, error, load) and never persisted. While
    /// it stays the same, the instant's objects and their paths and attributes do not
    /// change (a lazy pair only records, as they were, the objects that change later), so
    /// what was derived from them can be kept: the copy mount's object lists
    /// (`Engine::view`, [`crate::snap::view::PartCache`]).
    pub instant: u64,
    /// Last error, in state `error`.
    pub error: Option<String>,
    /// Progress.
    pub progress: Progress,
    /// Tracks whose pending bits are cleared in memory but whose clearing is not yet
    /// committed (between [`Pair::begin_clear`] and [`Pair::end_clear`]): host writes
    /// still treat them as needing copy-on-write, so they wait for the commit. Never
    /// persisted.
    pub clearing: TrackSet,
}

/// Pin changes the caller must apply to the allocator.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pins {
    /// Tracks to pin now.
    pub pin: TrackSet,
    /// Tracks to unpin now.
    pub unpin: TrackSet,
}

/// A new [`Pair::instant`] number (process-wide, never repeated).
fn next_instant() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

fn index_of(frozen: &[Frozen]) -> HashMap<u64, usize> {
    frozen.iter().enumerate().map(|(k, f)| (f.ino, k)).collect()
}

fn frozen_tracks(frozen: &[Frozen]) -> TrackSet {
    let mut s = TrackSet::new();
    for f in frozen {
        s.insert_extents(&f.extents);
    }
    s
}

impl Pair {
    /// A new pair in `forming`: every current track of the scope is to copy.
    pub fn new(id: PairId, scope: Scope, path: String, current: TrackSet, now: i64) -> Pair {
        let total = current.count();
        Pair {
            id,
            scope,
            path,
            state: PairState::Forming,
            forming: current,
            split_diff: TrackSet::new(),
            update_diff: TrackSet::new(),
            frozen: Vec::new(),
            lazy: None,
            frozen_at: HashMap::new(),
            frozen_saved: 0,
            split_ns: 0,
            instant: next_instant(),
            error: None,
            progress: Progress {
                total,
                copied: 0,
                last_copied: 0,
                started_ns: now,
            },
            clearing: TrackSet::new(),
        }
    }

    fn wrong_state(&self, op: &str) -> Error {
        match self.state {
            s if s.is_copying() && op != "release" => Error::Busy(format!(
                "{op}: pair {} is {} (wait for it to finish)",
                self.path,
                s.name()
            )),
            s => Error::invalid(format!(
                "{op} is not allowed in state {} of pair {}",
                s.name(),
                self.path
            )),
        }
    }

    fn start_op(&mut self, total: u64, now: i64) {
        self.progress.total = total;
        self.progress.copied = 0;
        self.progress.started_ns = now;
    }

    /// Tracks the copier must copy now (None when nothing is pending in this state).
    pub fn pending(&self) -> Option<&TrackSet> {
        match self.state {
            // Formed too: the copier keeps converging, so a later split has little to do.
            PairState::Forming
            | PairState::Formed
            | PairState::Splitting
            | PairState::Resyncing => Some(&self.forming),
            PairState::Updating => Some(&self.split_diff),
            _ => None,
        }
    }

    fn pending_mut(&mut self) -> Option<&mut TrackSet> {
        match self.state {
            PairState::Forming
            | PairState::Formed
            | PairState::Splitting
            | PairState::Resyncing => Some(&mut self.forming),
            PairState::Updating => Some(&mut self.split_diff),
            _ => None,
        }
    }

    /// Split: freeze `frozen` (the scope as of now). O(1) in data: nothing is copied
    /// here. Allowed from forming and formed (forming: the tracks not copied yet are
    /// simply still pending).
    pub fn split(&mut self, frozen: Vec<Frozen>, now: i64) -> Result<Pins> {
        if !matches!(self.state, PairState::Forming | PairState::Formed) {
            return Err(self.wrong_state("split"));
        }
        let keep = frozen_tracks(&frozen);
        // Pending tracks outside the frozen maps do not need copying any more.
        let pending = self.forming.intersection(&keep);
        self.forming.assign(pending);
        let pins = Pins {
            pin: keep,
            unpin: TrackSet::new(),
        };
        self.enter_splitting(frozen, None, now);
        Ok(pins)
    }

    /// The common end of a split (whole or lazy): the frozen map, the instant, empty
    /// record bitmaps, state `splitting` copying the forming-diff's pending tracks.
    fn enter_splitting(&mut self, frozen: Vec<Frozen>, lazy: Option<u64>, now: i64) {
        self.set_frozen(frozen, lazy);
        self.split_ns = now;
        self.split_diff.clear();
        self.update_diff.clear();
        self.state = PairState::Splitting;
        self.start_op(self.forming.count(), now);
        self.finish_if_done();
    }

    /// Installs a frozen map (all of it counted as stored) and the lazy limit, with the
    /// index by inode, under a new [`Pair::instant`] number.
    pub fn set_frozen(&mut self, frozen: Vec<Frozen>, lazy: Option<u64>) {
        self.frozen_at = index_of(&frozen);
        self.frozen_saved = frozen.len();
        self.frozen = frozen;
        self.lazy = lazy;
        self.instant = next_instant();
    }

    /// Lazy split: records the instant in O(1). `top` is the scope's top directory as
    /// of now, `limit` the next inode number. Nothing of the scope is read: pending
    /// stays the forming-diff (the tracks of the scope not copied yet, which the
    /// forming states keep within the scope's live tracks, `Pair::freed`), and each
    /// member is frozen just before its first change ([`Pair::lazy_freeze`]).
    pub fn split_lazy(&mut self, top: Frozen, limit: u64, now: i64) -> Result<Pins> {
        if !matches!(self.state, PairState::Forming | PairState::Formed) {
            return Err(self.wrong_state("split"));
        }
        let pins = Pins {
            pin: frozen_tracks(std::slice::from_ref(&top)),
            unpin: TrackSet::new(),
        };
        self.enter_splitting(vec![top], Some(limit), now);
        Ok(pins)
    }

    /// Lazy update: a new lazy instant. The objects frozen for the old one are dropped
    /// (their pins too); to copy: the split-diff (every track the scope's files wrote,
    /// allocated or brought in since the last instant and still map, `Pair::freed`),
    /// or, from `error`, `current` (every track of the scope, which the caller reads
    /// only then).
    pub fn update_lazy(
        &mut self,
        top: Frozen,
        limit: u64,
        current: Option<&TrackSet>,
        now: i64,
    ) -> Result<Pins> {
        let pending = match (self.state, current) {
            (PairState::Split, _) => self.split_diff.clone(),
            (PairState::Error, Some(c)) => c.clone(),
            (PairState::Error, None) => {
                return Err(Error::invalid("update from error needs the scope's tracks"));
            }
            _ => return Err(self.wrong_state("update")),
        };
        let old = frozen_tracks(&self.frozen);
        self.split_diff.assign(pending);
        self.update_diff.clear();
        self.forming.clear();
        let pins = Pins {
            pin: frozen_tracks(std::slice::from_ref(&top)),
            unpin: old,
        };
        self.set_frozen(vec![top], Some(limit));
        self.split_ns = now;
        self.error = None;
        self.state = PairState::Updating;
        self.start_op(self.split_diff.count(), now);
        self.finish_if_done();
        Ok(pins)
    }

    /// The instant's record of inode `ino` if a lazy pair froze it (or marked it absent).
    pub fn frozen_of(&self, ino: u64) -> Option<&Frozen> {
        self.frozen_at.get(&ino).map(|&k| &self.frozen[k])
    }

    /// The inode limit of a lazy pair in a frozen state (None otherwise).
    pub fn lazy_limit(&self) -> Option<u64> {
        self.lazy.filter(|_| self.state.is_frozen())
    }

    /// True if inode `ino` must still be frozen before its first change: a lazy pair in
    /// a frozen state, an inode that existed at the instant, not frozen yet.
    pub fn needs_freeze(&self, ino: u64) -> bool {
        self.lazy_limit()
            .is_some_and(|l| ino < l && !self.frozen_at.contains_key(&ino))
    }

    /// Adds the instant's record of one object of a lazy pair (see
    /// [`Pair::needs_freeze`]); returns the tracks to pin now. The record is appended
    /// to the database by the next commit (`frozen_saved`).
    pub fn lazy_freeze(&mut self, f: Frozen) -> TrackSet {
        let pin = frozen_tracks(std::slice::from_ref(&f));
        self.frozen_at.insert(f.ino, self.frozen.len());
        self.frozen.push(f);
        pin
    }

    /// True if the frozen copy holds inode `ino` (it keeps copy-on-write wherever it
    /// moves): an object of the frozen map, or, for a lazy pair, any inode that existed
    /// at the instant and is not marked absent (conservative: it may have been outside
    /// the scope).
    pub fn holds(&self, ino: u64) -> bool {
        match self.frozen_at.get(&ino) {
            Some(&k) => !self.frozen[k].absent,
            None => self.lazy_limit().is_some_and(|l| ino < l),
        }
    }

    /// Update: refresh the frozen copy to `frozen` (the scope as of now), copying only
    /// split-diff tracks and tracks new since the last instant. From `error`, this is a
    /// fresh split of every track.
    pub fn update(&mut self, frozen: Vec<Frozen>, now: i64) -> Result<Pins> {
        let old = match self.state {
            PairState::Split => frozen_tracks(&self.frozen),
            PairState::Error => TrackSet::new(),
            _ => return Err(self.wrong_state("update")),
        };
        let new = frozen_tracks(&frozen);
        // To copy: tracks of the new instant written since the last one, or new to it.
        let pending = self
            .split_diff
            .intersection(&new)
            .union(&new.difference(&old));
        self.split_diff.assign(pending);
        self.update_diff.clear();
        self.forming.clear();
        let pins = Pins {
            pin: new.difference(&old),
            unpin: old.difference(&new),
        };
        self.set_frozen(frozen, None);
        self.split_ns = now;
        self.error = None;
        self.state = PairState::Updating;
        self.start_op(self.split_diff.count(), now);
        self.finish_if_done();
        Ok(pins)
    }

    /// Resync: drop the frozen copy and converge back to `formed`. `current` is every
    /// track of the scope's live files now.
    pub fn resync(&mut self, current: &TrackSet, now: i64) -> Result<Pins> {
        if !matches!(self.state, PairState::Split | PairState::Error) {
            return Err(self.wrong_state("resync"));
        }
        let old = frozen_tracks(&self.frozen);
        let forming = if self.state == PairState::Error {
            current.clone()
        } else if self.lazy.is_some() {
            // Every track the scope maps now and did not map unchanged at the instant
            // was written, allocated or brought in since: it is in the split-diff.
            current.intersection(&self.split_diff)
        } else {
            current
                .intersection(&self.split_diff)
                .union(&current.difference(&old))
        };
        self.forming.assign(forming);
        self.split_diff.clear();
        self.update_diff.clear();
        self.set_frozen(Vec::new(), None);
        self.error = None;
        self.split_ns = 0;
        self.state = PairState::Resyncing;
        self.start_op(self.forming.count(), now);
        self.finish_if_done();
        Ok(Pins {
            pin: TrackSet::new(),
            unpin: old,
        })
    }

    /// Release: the pins to drop. The caller deletes the pair.
    pub fn release(&self) -> Pins {
        Pins {
            pin: TrackSet::new(),
            unpin: frozen_tracks(&self.frozen),
        }
    }

    /// A copy failed: enter `error`, drop the frozen copy (it can no longer be trusted).
    pub fn fail(&mut self, msg: String) -> Pins {
        let unpin = frozen_tracks(&self.frozen);
        self.set_frozen(Vec::new(), None);
        self.forming.clear();
        self.split_diff.clear();
        self.update_diff.clear();
        self.error = Some(msg);
        self.state = PairState::Error;
        Pins {
            pin: TrackSet::new(),
            unpin,
        }
    }

    /// Of the tracks a host write is about to change, those that must be copied to the
    /// copy image first (copy-on-write).
    pub fn cow_needed(&self, tracks: &[u64]) -> Vec<u64> {
        let pending = match self.state {
            PairState::Splitting | PairState::Updating => self.pending(),
            _ => None,
        };
        tracks
            .iter()
            .copied()
            .filter(|&t| self.clearing.contains(t) || pending.is_some_and(|p| p.contains(t)))
            .collect()
    }

    /// Frozen states: `tracks` are synced on the copy image; clear their pending bits
    /// in memory (so the chunks to commit can be built) but keep them in `clearing`
    /// until [`Pair::end_clear`], after the commit.
    pub fn begin_clear(&mut self, tracks: &[u64]) {
        for &t in tracks {
            self.clearing.insert(t);
        }
        self.copied(tracks);
    }

    /// Marks every bitmap chunk for rewriting (after a failed commit lost the list).
    pub fn mark_all_dirty(&mut self) {
        self.forming.mark_all_dirty();
        self.split_diff.mark_all_dirty();
        self.update_diff.mark_all_dirty();
    }

    /// The clearing of the bits is committed: host writes may go ahead.
    pub fn end_clear(&mut self) {
        self.clearing = TrackSet::new();
    }

    /// Records that the host wrote (or allocated) `tracks` inside the scope. Must be
    /// called after the data reached the volume and after any copy-on-write.
    pub fn written(&mut self, tracks: &[u64]) {
        let Some(set) = self.record_mut() else {
            return;
        };
        for &t in tracks {
            set.insert(t);
        }
        if self.state == PairState::Forming || self.state == PairState::Resyncing {
            self.progress.total = self.progress.copied + self.forming.count();
        }
    }

    /// Records that a live file of the scope no longer maps `tracks`. In the unfrozen
    /// states they need no copy any more; frozen maps keep (and pin) theirs.
    pub fn freed(&mut self, tracks: &[u64]) {
        // The record bitmap of the frozen states loses them too (they are not part of
        // the next instant unless written again): a lazy update copies the split-diff
        // as it is.
        let Some(set) = self.record_mut() else {
            return;
        };
        for &t in tracks {
            set.remove(t);
        }
    }

    /// The bitmap that records host writes in the current state: forming-diff while
    /// unfrozen, split-diff while split, update-diff while updating (none in `error`).
    fn record_mut(&mut self) -> Option<&mut TrackSet> {
        match self.state {
            PairState::Forming | PairState::Formed | PairState::Resyncing => {
                Some(&mut self.forming)
            }
            PairState::Splitting | PairState::Split => Some(&mut self.split_diff),
            PairState::Updating => Some(&mut self.update_diff),
            PairState::Error => None,
        }
    }

    /// Records that `tracks` are now on the copy image (durably). Advances the state
    /// when nothing is left to copy.
    pub fn copied(&mut self, tracks: &[u64]) {
        let mut n = 0;
        if let Some(p) = self.pending_mut() {
            for &t in tracks {
                if p.remove(t) {
                    n += 1;
                }
            }
        }
        self.progress.copied += n;
        self.finish_if_done();
    }

    fn finish_if_done(&mut self) {
        if self.pending().is_some_and(|p| p.is_empty()) {
            self.progress.last_copied = self.progress.copied;
            self.state = match self.state {
                PairState::Forming | PairState::Resyncing => PairState::Formed,
                PairState::Splitting => PairState::Split,
                PairState::Updating => {
                    // Hand-off through assign/clear so the rows of chunks that became
                    // empty are deleted too (a stale set bit on disk would read as pending
                    // after a crash).
                    let written = self.update_diff.clone();
                    self.update_diff.clear();
                    self.split_diff.assign(written);
                    PairState::Split
                }
                s => s,
            };
        }
    }

    /// After an unclean shutdown the bitmap that records host writes (not written
    /// through synchronously) may have lost bits: assume every current track changed.
    pub fn recover_unclean(&mut self, current: &TrackSet) {
        let set = match self.state {
            PairState::Forming | PairState::Formed | PairState::Resyncing => &mut self.forming,
            PairState::Splitting | PairState::Split => &mut self.split_diff,
            PairState::Updating => &mut self.update_diff,
            PairState::Error => return,
        };
        set.union_with(current);
        if self.state == PairState::Formed {
            self.state = PairState::Forming;
        }
        self.finish_if_done();
    }

    /// Drops the bits of `tracks` (a file left the scope; its tracks are not in the
    /// frozen copy, whose tracks keep their bits). Returns true if a bit was dropped.
    pub fn drop_tracks(&mut self, tracks: &[u64]) -> bool {
        let pinned = self.pinned_tracks();
        let gone: TrackSet = tracks
            .iter()
            .copied()
            .filter(|&t| !pinned.contains(t))
            .collect();
        self.narrow_bitmaps(|set| set.difference(&gone))
    }

    /// Keeps only the bits of `current` (the tracks the members map now) and of the
    /// frozen copy's tracks. A bit for any other track is left over from a file that
    /// left the scope (the membership rebuilt at mount gave it to another pair or none):
    /// copying it would write the volume's data over whatever another pair's frozen
    /// copy keeps at that address of the copy image.
    /// Returns true if a bit was dropped.
    pub fn retain_tracks(&mut self, current: &TrackSet) -> bool {
        let keep = current.union(&self.pinned_tracks());
        self.narrow_bitmaps(|set| set.intersection(&keep))
    }

    /// Replaces each of the three bitmaps by `f` of it (a subset), then finishes a copy
    /// that has nothing left. True if a bit was dropped or the state moved on.
    fn narrow_bitmaps(&mut self, f: impl Fn(&TrackSet) -> TrackSet) -> bool {
        let mut changed = false;
        for set in [
            &mut self.forming,
            &mut self.split_diff,
            &mut self.update_diff,
        ] {
            let kept = f(set);
            if kept.count() != set.count() {
                set.assign(kept);
                changed = true;
            }
        }
        let before = self.state;
        self.finish_if_done();
        changed || self.state != before
    }

    /// Tracks pinned by the frozen copy.
    pub fn pinned_tracks(&self) -> TrackSet {
        frozen_tracks(&self.frozen)
    }

    /// Reads of a frozen track come from the volume while this is true.
    pub fn read_from_volume(&self, t: u64) -> bool {
        self.clearing.contains(t)
            || (self.pending().is_some_and(|p| p.contains(t)) && self.state.is_frozen())
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod group_tests;
