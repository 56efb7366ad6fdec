//! What the pair engine needs from the namespace, and nothing more: the members of a
//! scope and their tracks, a scope frozen into [`Frozen`] objects, the allocator's pins,
//! and the namespace's commits. The core's `Fs` implements it and passes itself to each
//! engine call; the engine never sees the filesystem object, and `snap` does not import
//! the core's `fs` module.
//!
//! Every method takes the namespace lock itself (it is above the pair state in the lock
//! order, [`crate::core::locks`]); a caller holds no pair state lock (`Slot::p`) across a
//! call.

use crate::core::extent::Segment;
use crate::core::trackset::TrackSet;
use crate::error::Result;
use crate::meta::PairDelta;
use crate::snap::pair::{Frozen, PairId, Pins, Scope};
use crate::snap::view::{Children, Cursor};

/// The namespace seen by the pair engine.
pub trait Namespace: Sync {
    /// `Err(ReadOnly)` on a read-only mount or after the metadata store failed.
    fn check_writable(&self) -> Result<()>;
    /// True if inode `ino` exists (loading it).
    fn exists(&self, ino: u64) -> Result<bool>;
    /// The pair inode `ino` belongs to (loading it; `NotFound` if it does not exist).
    fn pair_of(&self, ino: u64) -> Result<Option<PairId>>;
    /// The inodes pair `id` covers now: the file, or the inodes beneath its directory
    /// that carry this pair (a file with a pair of its own stays out).
    fn members_of(&self, scope: Scope, id: PairId) -> Result<Vec<u64>>;
    /// Current tracks of the inodes pair `id` covers.
    fn scope_tracks(&self, scope: Scope, id: PairId) -> Result<TrackSet>;
    /// The frozen objects of pair `id`'s scope as of now, under one hold of the
    /// namespace lock (parents first).
    fn freeze(&self, scope: Scope, id: PairId) -> Result<Vec<Frozen>>;
    /// A lazy instant of a directory or root scope: under one hold of the namespace
    /// lock, calls `set` with the top directory's object as of now (at its path) and
    /// the next inode number (every inode below it existed before the instant), so no
    /// change of the namespace falls between the instant and the pair's new state.
    /// O(1). Returns what `set` returns.
    fn instant(
        &self,
        scope: Scope,
        set: &mut dyn FnMut(Frozen, u64) -> Result<Pins>,
    ) -> Result<Pins>;
    /// A batch of the unchanged members of lazy pair `id` named in directory `dir` now,
    /// after `after` (None: from the start), each as its object at the instant (path: just the
    /// name): live entries whose inode existed at the instant, belongs to the pair and is
    /// not frozen in it; with the cookie to continue after. None if `dir` is gone. One
    /// hold of the namespace lock per batch (a bounded number of entries).
    fn instant_children(&self, id: PairId, dir: u64, after: Option<Cursor>) -> Result<Children>;
    /// Size of file `ino` at lazy pair `id`'s instant and the segments of its file tracks
    /// `[f0, f0+n)`: from the pair's record if it froze the file, else from the live map
    /// (unchanged since), under one hold of the namespace lock (the map is not copied).
    fn instant_file(&self, id: PairId, ino: u64, f0: u64, n: u64) -> Result<(u64, Vec<Segment>)>;
    /// Makes inode `ino` (a file or directory) and everything beneath it members of a
    /// new pair: checks none is in a pair yet, then, under the namespace lock, calls
    /// `register` with the scope, the path and the current tracks; `register` returns
    /// the new pair's id, which the members take.
    fn claim(
        &self,
        ino: u64,
        register: &mut dyn FnMut(Scope, &str, TrackSet) -> PairId,
    ) -> Result<PairId>;
    /// Third embodiment ([`crate::snap::group`]): regular file `ino`, a member of the
    /// directory or root pair `group`, leaves it for a new pair of its own: freezes it
    /// in `group`'s lazy instant if that has not (the group's frozen copy keeps it as it
    /// is now) and allocates new tracks for every track of it that a frozen copy pins;
    /// copies their data on the volume without the namespace lock (the caller holds the
    /// write barrier and the commits); then, under the lock again, points the file's
    /// extents at the new tracks, drops its tracks from `group`'s bitmaps and calls
    /// `register` with the file's scope, path and current tracks; the file takes the id
    /// `register` returns. `Busy` if `ino` is not a regular file of `group`.
    fn split_off(
        &self,
        ino: u64,
        group: PairId,
        register: &mut dyn FnMut(Scope, &str, TrackSet) -> PairId,
    ) -> Result<PairId>;
    /// The group a file pair's file would join at release: its parent directory's pair
    /// if that is a directory or root pair (None otherwise).
    fn group_of(&self, ino: u64) -> Result<Option<PairId>>;
    /// Pair `id` is released: under the namespace lock, runs `unregister` (so that no
    /// inode loaded from now on finds the pair), then takes the pair off cached inodes.
    fn forget_pair(&self, id: PairId, unregister: &mut dyn FnMut());
    /// After pair `id` was released: its former members (`members`, parents first) join
    /// the enclosing pair, if any, with their tracks recorded as written there.
    fn hand_over(&self, id: PairId, members: &[u64]) -> Result<()>;
    /// Pins the frozen tracks of a stored pair at mount (`Corrupt` if one lies outside
    /// the volume).
    fn pin_frozen(&self, id: PairId, tracks: &TrackSet) -> Result<()>;
    /// Applies a transition's pin changes to the allocator.
    fn apply_pins(&self, pins: &Pins);
    /// Allocates `n` volume tracks as slots of named generations (used: no file gets
    /// them; nothing is written to them on the volume). `NoSpace` if fewer are free.
    fn alloc_slots(&self, n: u64) -> Result<Vec<u64>>;
    /// Frees generation slots (held until the next commit, like any freed track).
    fn free_slots(&self, slots: &[u64]);
    /// Marks stored generation slots used at mount (`Corrupt` if a file maps one).
    fn mark_slots(&self, slots: &[u64]) -> Result<()>;
    /// How many of `tracks` no live file uses (kept only by frozen copies).
    fn unused_count(&self, tracks: &TrackSet) -> u64;
    /// The path of a writable clone that reads from pair `id`'s frozen copy, if any
    /// ([`crate::core::clone::Dependents`]).
    fn clone_dependent(&self, id: PairId) -> Result<Option<String>>;
    /// Commits everything dirty plus `extra` pair deltas (durable on return).
    fn commit(&self, extra: Vec<PairDelta>) -> Result<()>;
    /// [`Namespace::commit`] with a full flush barrier of both images first.
    fn commit_destaged(&self, extra: Vec<PairDelta>) -> Result<()>;
}
