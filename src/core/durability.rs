//! The durability pipeline: the one component every data sync and metadata commit goes
//! through ([`Durability`]). It owns
//!
//! - the **order of syncs**: volume image, then copy image, then the SQLite transaction,
//!   then any further [`DurabilitySink`]s (a replica, `repl::link`);
//! - **poisoning** after a failed sync (through [`Checked`], whose sync returns Ok only if
//!   an fsync that began after the caller's writes succeeded);
//! - **failing the affected pairs**: a failed sync of the copy image may have dropped any
//!   pair's copies, so *every* pair is failed ([`PairHooks::copy_image_lost`]), and the
//!   copy image's poison can only be cleared (by split/update/resync) once that is done;
//! - **restoring a batch** after a failed commit: the core's dirty rows
//!   ([`BatchSource::restore`]) and the pairs' bitmap chunks ([`PairHooks::restore`]);
//! - the **metadata-failed flag**: after a failed commit every later change and commit is
//!   refused and the clean flag is never written, so the next mount repairs.
//!
//! The pipeline knows neither the namespace nor the pair engine: the core passes its dirty
//! rows as a [`BatchSource`] and the engine's pairs as [`PairHooks`].
//!
//! Replication (`repl::link`): the writes themselves reach a secondary through a
//! [`Volume`] wrapper around the images (every `write_at`/`discard` forwarded), the
//! metadata transactions through the store's `CommitTap`, and its durability points
//! through one more [`DurabilitySink`] registered with [`Durability::add_sink`] (attached
//! at open by an [`Attach`] hook); no call site in the core or the engine changes.
//!
//! ```text
//!  Fs::commit ──┐                 ┌─> vol.sync ─> copy.sync ─> meta.commit ─> sinks
//!  Engine::cow ─┼─> Durability ───┤      │ fail: restore      │ fail: all pairs fail
//!  confirm ─────┘                 └─> copy.sync ─> meta.commit (pair bitmaps only)
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use crate::error::{Error, Result};
use crate::meta::{Batch, Meta, PairDelta};
use crate::store::volume::{Checked, Volume};

/// One more place every durability point is sent to (e.g. a replica): data syncs and
/// metadata commits, in the pipeline's order, after the local images and database.
pub trait DurabilitySink: Send + Sync {
    /// Name for logs.
    fn name(&self) -> &str;
    /// Makes every data write sent to this sink before the call durable.
    fn sync_data(&self) -> Result<()>;
    /// Commits a metadata batch (called after every `sync_data` succeeded).
    fn commit_meta(&self, batch: &Batch) -> Result<()>;
    /// The data sync that precedes a metadata commit (full or pair-only). Default:
    /// [`DurabilitySink::sync_data`]; a sink whose `commit_meta` makes the data durable
    /// first anyway may only start it here.
    fn sync_before_commit(&self) -> Result<()> {
        self.sync_data()
    }
    /// A status line for `pairfs status` (`user.pairfs.replica`), empty if none.
    fn status(&self) -> String {
        String::new()
    }
    /// The volume is unmounting: every durability point has been sent; finish.
    fn close(&self) {}
    /// Told of the metadata store when added (a replica's resync copies the database).
    fn attach_meta(&self, _meta: &Arc<Mutex<Meta>>) {}
}

/// Attaches a replica at mount (implemented by `repl::link::Replica`; the core only
/// calls it): called by [`crate::core::volfile::open`] with the mount lock held, the
/// database open and migrated, the images opened and checked, *before* anything is
/// written. It may copy everything to the secondary, then installs its
/// [`crate::meta::CommitTap`] on `meta` and returns the images wrapped (every write and
/// discard also goes to the secondary) and the sink the pipeline adds.
pub trait Attach: Send + Sync {
    /// See the trait doc.
    #[allow(clippy::type_complexity)]
    fn attach(
        &self,
        meta: &mut Meta,
        meta_path: &std::path::Path,
        vol: Box<dyn Volume>,
        copy: Box<dyn Volume>,
    ) -> Result<(Box<dyn Volume>, Box<dyn Volume>, Arc<dyn DurabilitySink>)>;
}

/// [`Attach`] in [`crate::core::fs::Options`] (cloneable, printable).
#[derive(Clone)]
pub struct ReplicaHook(pub Arc<dyn Attach>);

impl std::fmt::Debug for ReplicaHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReplicaHook")
    }
}

/// The core's side of a commit: its dirty rows and the tracks held until they commit.
pub trait BatchSource {
    /// Takes every dirty row (the dirty sets are empty afterwards) and the held tracks.
    fn take(&self) -> (Batch, Vec<(u64, u64)>);
    /// Puts a batch that did not commit back (a change made since wins).
    fn restore(&self, batch: &Batch, held: Vec<(u64, u64)>);
    /// The batch is durable: its freed tracks may be reused.
    fn committed(&self, held: &[(u64, u64)]);
}

/// The pair engine's side of a commit (registered by the facade; the pipeline never
/// imports the engine).
pub trait PairHooks {
    /// Dirty pair rows and bitmap chunks. Called with the metadata lock held (the guard
    /// is the proof), so chunk states reach the database in the order they were taken.
    fn take(&self, meta: &MutexGuard<'_, Meta>) -> Vec<PairDelta>;
    /// A commit carrying `deltas` failed: mark those pairs (all their chunks) dirty again.
    fn restore(&self, deltas: &[PairDelta]);
    /// The copy image failed a sync: any pair's copies may be lost; fail every pair.
    fn copy_image_lost(&self, e: &Error);
}

/// The durability pipeline (see the module doc).
pub struct Durability {
    vol: Arc<Checked>,
    copy: Arc<Checked>,
    meta: Arc<Mutex<Meta>>,
    /// Serializes full commits.
    commit_lock: Mutex<()>,
    /// Held across a copy-image sync and the failing of pairs after it failed, and by
    /// [`Durability::clear_copy_poison`]: no pair can confirm copies on the copy image
    /// between a failed sync and every pair being failed.
    copy_lock: Mutex<()>,
    meta_failed: AtomicBool,
    sinks: RwLock<Vec<Arc<dyn DurabilitySink>>>,
    /// Full commits done (statistics).
    pub commits: AtomicU64,
}

impl Durability {
    /// A pipeline over the two images and the metadata store.
    pub fn new(vol: Arc<Checked>, copy: Arc<Checked>, meta: Arc<Mutex<Meta>>) -> Self {
        Durability {
            vol,
            copy,
            meta,
            commit_lock: Mutex::new(()),
            copy_lock: Mutex::new(()),
            meta_failed: AtomicBool::new(false),
            sinks: RwLock::new(Vec::new()),
            commits: AtomicU64::new(0),
        }
    }

    /// Adds a sink after the local images and database.
    pub fn add_sink(&self, sink: Arc<dyn DurabilitySink>) {
        sink.attach_meta(&self.meta);
        self.sinks
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(sink);
    }

    fn sinks(&self) -> Vec<Arc<dyn DurabilitySink>> {
        self.sinks.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// True if a sink (a replica) is attached.
    pub fn has_sinks(&self) -> bool {
        !self.sinks().is_empty()
    }

    /// The sinks' status lines (`none` without a sink).
    pub fn sinks_status(&self) -> String {
        let s: String = self.sinks().iter().map(|s| s.status()).collect();
        if s.is_empty() { "none\n".into() } else { s }
    }

    /// Ends every sink after the last commit (unmount).
    pub fn close_sinks(&self) {
        for s in self.sinks() {
            s.close();
        }
    }

    /// Refuses when a metadata commit failed since mount.
    pub fn check(&self) -> Result<()> {
        if self.meta_failed() {
            Err(Error::Poisoned("metadata database"))
        } else {
            Ok(())
        }
    }

    /// True once a metadata commit failed.
    pub fn meta_failed(&self) -> bool {
        self.meta_failed.load(Ordering::Acquire)
    }

    fn fail_meta(&self, e: &Error) {
        log::error!("metadata commit failed: {e}; refusing further changes until remount");
        self.meta_failed.store(true, Ordering::Release);
    }

    fn lock_meta(&self) -> MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Syncs the copy image; on failure fails every pair (under `copy_lock`, so no
    /// split/update/resync clears the poison before that is done).
    pub fn sync_copy(&self, pairs: &dyn PairHooks) -> Result<()> {
        let _c = self.copy_lock.lock().unwrap_or_else(|p| p.into_inner());
        let r = self.copy.sync();
        if let Err(e) = &r {
            pairs.copy_image_lost(e);
        }
        r
    }

    /// Holds off every full commit while the guard lives (pair-only commits still run):
    /// a file split off its group (`Engine::split_off`) changes memory in several steps
    /// that must reach the database in one transaction.
    pub fn hold_commits(&self) -> MutexGuard<'_, ()> {
        self.commit_lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Clears the copy image's poison (an operator's update or resync recovers it).
    pub fn clear_copy_poison(&self) {
        let _c = self.copy_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.copy.clear_poison();
    }

    /// Makes the volume's data durable (volume image, then every sink's data), without a
    /// metadata commit: `fdatasync` of a file whose shape is already committed.
    pub fn sync_data(&self) -> Result<()> {
        self.check()?;
        self.vol.sync()?;
        for s in &self.sinks() {
            if let Err(e) = s.sync_data() {
                log::error!("{}: data sync failed: {e}", s.name());
                return Err(e);
            }
        }
        Ok(())
    }

    /// The full commit: volume sync → copy-image sync → one transaction with the core's
    /// dirty rows, the dirty pairs and `extra` → sinks. After it returns Ok, all data
    /// written before the call and all metadata are durable.
    pub fn commit(
        &self,
        core: &dyn BatchSource,
        pairs: &dyn PairHooks,
        extra: Vec<PairDelta>,
    ) -> Result<()> {
        self.check()?;
        let _c = self.commit_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.check()?;
        let (mut batch, held) = core.take();
        if let Err(e) = self.vol.sync() {
            // Nothing of the batch may be committed over data that is not durable; keep
            // it dirty (the volume is poisoned now, so no commit succeeds until remount).
            core.restore(&batch, held);
            return Err(e);
        }
        // A failed copy-image sync fails the pairs (their frozen copies are withdrawn in
        // this very batch); the namespace's rows still commit.
        let _ = self.sync_copy(pairs);
        let sinks = self.sinks();
        for s in &sinks {
            if let Err(e) = s.sync_before_commit() {
                log::error!("{}: data sync failed: {e}", s.name());
                core.restore(&batch, held);
                return Err(e);
            }
        }
        let mut meta = self.lock_meta();
        batch.pairs = pairs.take(&meta);
        batch.pairs.extend(extra);
        let r = meta.commit(&batch);
        drop(meta);
        if let Err(e) = r {
            self.fail_meta(&e);
            core.restore(&batch, held);
            pairs.restore(&batch.pairs);
            return Err(e);
        }
        for s in &sinks {
            if let Err(e) = s.commit_meta(&batch) {
                log::error!("{}: metadata commit failed: {e}", s.name());
                self.meta_failed.store(true, Ordering::Release);
                // The freed tracks stay held (unused) until remount: the sink may still
                // map them.
                return Err(e);
            }
        }
        self.commits.fetch_add(1, Ordering::Relaxed);
        core.committed(&held);
        Ok(())
    }

    /// Commits pair rows and bitmaps only (cleared pending bits after their copies were
    /// synced, a new pair state). `take` runs under the metadata lock; on failure the
    /// flag is set and `restore` gets the deltas back.
    pub fn commit_pairs(
        &self,
        take: &mut dyn FnMut() -> Vec<PairDelta>,
        restore: &mut dyn FnMut(&[PairDelta]),
    ) -> Result<()> {
        let sinks = self.sinks();
        for s in &sinks {
            s.sync_before_commit()?;
        }
        let mut meta = self.lock_meta();
        let deltas = take();
        if let Err(e) = self.check() {
            drop(meta);
            restore(&deltas);
            return Err(e);
        }
        let batch = Batch {
            pairs: deltas,
            ..Default::default()
        };
        let r = meta.commit(&batch);
        drop(meta);
        if let Err(e) = r {
            self.fail_meta(&e);
            restore(&batch.pairs);
            return Err(e);
        }
        for s in &sinks {
            if let Err(e) = s.commit_meta(&batch) {
                log::error!("{}: metadata commit failed: {e}", s.name());
                self.meta_failed.store(true, Ordering::Release);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Commits a record that is not part of a batch (an image's new location, a
    /// migration's progress) in its own transaction: `write` runs under the metadata
    /// lock. It syncs no image: the caller has made the data it describes durable. A
    /// failure sets the metadata-failed flag like any failed commit.
    pub fn commit_record(&self, write: &mut dyn FnMut(&Meta) -> Result<()>) -> Result<()> {
        self.check()?;
        let meta = self.lock_meta();
        let r = write(&meta);
        drop(meta);
        if let Err(e) = &r {
            self.fail_meta(e);
        }
        r
    }

    /// Writes the clean flag after a final commit; never after a failed commit (the next
    /// mount must then treat the volume as unclean and repair).
    pub fn mark_clean(&self) -> Result<()> {
        self.check()?;
        self.lock_meta().set_clean(true)
    }
}
