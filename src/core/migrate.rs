//! Online migration of the volume image or the copy image (`pairfs migrate`), the
//! driver above [`MigratingVolume`] (which mirrors host writes and copies batches).
//!
//! One migration at a time. Its durable record is a few `super` rows
//! (`migrate_image`, `migrate_target`, `migrate_from`, `migrate_mark`); where each image
//! lives is `volume_image` / `copy_image` (absent: where the command line says), which
//! `pairfs mount` follows ([`crate::core::volfile::follow_locations`]).
//!
//! Order of writes (docs/design.md, "Online migration"):
//! 1. record the migration (target, mark 0), then mirror every write to both images (syncs
//!    go to the source alone: it stays the volume until the switch);
//! 2. copy every track in order, in 1 MiB batches; every 64 MiB sync the target, then
//!    commit the mark (tracks below it were copied);
//! 3. switch: syncs wait; sync the target; commit `<image>_image = TARGET` with the
//!    migration rows deleted, in one transaction (the one durable switch point); swap
//!    the handle; syncs go on, to the target only.
//!
//! A kill before 3's commit: the next mount uses the source, which never stopped being
//! complete and current, and resumes: tracks below the mark are *verified* (read on both,
//! rewritten where they differ: a write may have reached one image and not the other),
//! the rest copied. After the commit: the next mount uses the target.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::core::durability::Durability;
use crate::core::volfile;
use crate::error::{Error, Result};
use crate::meta::Meta;
use crate::store::lock::VolumeLock;
use crate::store::migrate::MigratingVolume;
use crate::store::nbd::NbdVolume;
use crate::store::volume::{FileVolume, Volume};

/// `super` row: where the volume image is (set by a migration).
pub const KEY_VOLUME: &str = "volume_image";
/// `super` row: where the copy image is (set by a migration).
pub const KEY_COPY: &str = "copy_image";
const K_IMAGE: &str = "migrate_image";
const K_TARGET: &str = "migrate_target";
const K_FROM: &str = "migrate_from";
const K_MARK: &str = "migrate_mark";
/// Bytes per copy batch.
const BATCH_BYTES: u64 = 1 << 20;
/// Bytes between durable marks.
const MARK_BYTES: u64 = 64 << 20;
/// Bytes between syncs of the target (host syncs go to the source only), so that the
/// switch, which holds syncs back while it syncs the target, has little left to flush.
const SYNC_BYTES: u64 = 8 << 20;

/// Which image moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    /// The volume image.
    Volume,
    /// The copy image.
    Copy,
}

impl Which {
    /// `volume` or `copy`.
    pub fn name(self) -> &'static str {
        match self {
            Which::Volume => "volume",
            Which::Copy => "copy",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Which::Volume => KEY_VOLUME,
            Which::Copy => KEY_COPY,
        }
    }

    fn parse(s: &str) -> Option<Which> {
        match s {
            "volume" => Some(Which::Volume),
            "copy" => Some(Which::Copy),
            _ => None,
        }
    }
}

/// What the migrator knows of the mount's files.
#[derive(Debug, Clone, Default)]
pub struct Places {
    /// The metadata database.
    pub meta: PathBuf,
    /// The volume image in use.
    pub volume: PathBuf,
    /// The copy image in use.
    pub copy: PathBuf,
}

struct Job {
    which: Which,
    target: String,
    from: String,
    /// Tracks below this were copied before a restart: verified, not blindly copied.
    verify_below: u64,
    /// The target reads as zeros where nothing was written (a file we just created).
    fresh: bool,
    /// Next track to copy.
    cursor: u64,
    /// Cursor when this mount started the job (for the rate).
    start_cursor: u64,
    started: Instant,
    written: u64,
    abort: bool,
    /// Between the durable switch and the swap (shown only with the test hook's pause).
    switching: bool,
    /// A regular file we created: removed if the migration is aborted.
    created: Option<PathBuf>,
    locks: Vec<VolumeLock>,
}

#[derive(Default)]
struct State {
    job: Option<Job>,
    /// How the last migration ended (for `user.pairfs.migration`).
    last: Option<String>,
    stop: bool,
    /// Locks held until unmount (the source's and target's after a switch).
    held: Vec<VolumeLock>,
    places: Places,
}

/// The migrator of one mount (see the module doc).
pub struct Migrator {
    vol: Arc<MigratingVolume>,
    copy: Arc<MigratingVolume>,
    track_size: u64,
    tracks: u64,
    st: Mutex<State>,
    cv: Condvar,
    /// Copy rate limit in bytes per second (`PAIRFS_MIGRATE_BPS` in the daemon's
    /// environment), none by default.
    bps: Option<u64>,
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "'"))
}

/// Opens (or, for a path that does not exist, creates) a migration target of `size`
/// bytes. Returns the volume and whether it is a file we created.
fn open_target(target: &str, size: u64, resume: bool) -> Result<(Box<dyn Volume>, bool)> {
    let path = Path::new(target);
    if volfile::is_uri(path) {
        let v = NbdVolume::open(target, true, "migration target")?;
        if v.len() < size {
            return Err(Error::invalid(format!(
                "migration target {target}: the export is {} bytes, smaller than the image ({size})",
                v.len()
            )));
        }
        return Ok((Box::new(v), false));
    }
    match std::fs::metadata(path) {
        Ok(m) => {
            use std::os::unix::fs::FileTypeExt;
            if !m.file_type().is_block_device() && !resume {
                return Err(Error::Exists(format!(
                    "migration target {target} exists (give a new file, a block device or an NBD URI)"
                )));
            }
            let v = FileVolume::open(path, true, "migration target")?;
            if v.len() < size {
                return Err(Error::invalid(format!(
                    "migration target {target} is {} bytes, smaller than the image ({size})",
                    v.len()
                )));
            }
            Ok((Box::new(v), false))
        }
        Err(_) if resume => Err(Error::NotFound(format!("migration target {target}"))),
        Err(_) => Ok((
            Box::new(FileVolume::create(path, size, "migration target")?),
            true,
        )),
    }
}

impl Migrator {
    /// A migrator over the two images of a mount.
    pub fn new(
        vol: Arc<MigratingVolume>,
        copy: Arc<MigratingVolume>,
        track_size: u64,
        tracks: u64,
        mut places: Places,
    ) -> Self {
        // Recorded places must not depend on the daemon's working directory.
        for p in [&mut places.meta, &mut places.volume, &mut places.copy] {
            if !p.as_os_str().is_empty()
                && !volfile::is_uri(p)
                && let Ok(a) = std::path::absolute(&*p)
            {
                *p = a;
            }
        }
        Migrator {
            vol,
            copy,
            track_size,
            tracks,
            st: Mutex::new(State {
                places,
                ..State::default()
            }),
            cv: Condvar::new(),
            bps: std::env::var("PAIRFS_MIGRATE_BPS")
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .filter(|&b| b > 0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn image(&self, w: Which) -> &Arc<MigratingVolume> {
        match w {
            Which::Volume => &self.vol,
            Which::Copy => &self.copy,
        }
    }

    /// Releases every lock the migrator holds (a running job's target locks and those
    /// kept after a switch). Called at unmount, after the last commit, so that the locks
    /// a target took are free before the volume's mount lock is: `pairfs umount` waits on
    /// that one, and a `pairfs fsck` right after must find the new location free. A job
    /// left running resumes at the next mount (it is recorded in the metadata).
    pub fn release_locks(&self) {
        let mut st = self.lock();
        st.held.clear();
        if let Some(j) = st.job.as_mut() {
            j.locks.clear();
        }
    }

    /// The image locations in use now.
    pub fn places(&self) -> Places {
        self.lock().places.clone()
    }

    /// The locks a target needs: a volume target becomes the mount lock (the file, or
    /// `META.lock` for a URI, unless the mount already holds that); a copy-image target
    /// is locked against snapshot mounts until the switch.
    fn target_locks(&self, which: Which, target: &str, places: &Places) -> Result<Vec<VolumeLock>> {
        let t = Path::new(target);
        let mut locks = Vec::new();
        match which {
            Which::Volume => {
                let lk = volfile::image_lock_path(&places.meta, t, ".lock");
                if lk != volfile::image_lock_path(&places.meta, &places.volume, ".lock") {
                    locks.push(crate::store::lock::lock(&lk, true)?);
                }
            }
            Which::Copy => {
                // The source's snapshot lock stays the engine's until the switch (a snapshot
                // mount of it keeps refusing root-pair update/resync/release); the target's
                // is held so that nothing mounts it before it is the copy image.
                let src = volfile::image_lock_path(&places.meta, &places.copy, ".copy.lock");
                let lk = volfile::image_lock_path(&places.meta, t, ".copy.lock");
                if lk != src {
                    locks.push(crate::store::lock::lock(&lk, true)?);
                }
            }
        }
        Ok(locks)
    }

    /// Starts a migration of `which` to `target` (`pairfs migrate`).
    pub fn start(&self, d: &Durability, which: Which, target: &str) -> Result<()> {
        let target = target.trim();
        if target.is_empty() {
            return Err(Error::invalid("migrate: no target given"));
        }
        let target = if volfile::is_uri(Path::new(target)) {
            target.to_string()
        } else {
            std::path::absolute(target)
                .map_err(|e| Error::io("migration target", e))?
                .display()
                .to_string()
        };
        let mut st = self.lock();
        if st.job.is_some() {
            return Err(Error::Busy("a migration is already running".into()));
        }
        let from = match which {
            Which::Volume => st.places.volume.clone(),
            Which::Copy => st.places.copy.clone(),
        };
        if Path::new(&target) == from {
            return Err(Error::invalid(format!(
                "the {} image is already at {target}",
                which.name()
            )));
        }
        let size = self.image(which).len();
        let (tv, created) = open_target(&target, size, false)?;
        let created = created.then(|| PathBuf::from(&target));
        let locks = match self.target_locks(which, &target, &st.places) {
            Ok(l) => l,
            Err(e) => {
                if let Some(p) = &created {
                    let _ = std::fs::remove_file(p);
                }
                return Err(e);
            }
        };
        let from = from.display().to_string();
        let r = d.commit_record(&mut |m: &Meta| {
            m.set_super_values(&[
                (K_IMAGE, Some(which.name())),
                (K_TARGET, Some(&target)),
                (K_FROM, Some(&from)),
                (K_MARK, Some("0")),
            ])
        });
        let r = r.and_then(|_| self.image(which).start(Arc::from(tv)));
        if let Err(e) = r {
            if let Some(p) = &created {
                let _ = std::fs::remove_file(p);
            }
            return Err(e);
        }
        log::info!(
            "migration of the {} image from {from} to {target} started",
            which.name()
        );
        st.job = Some(Job {
            which,
            target,
            from,
            verify_below: 0,
            fresh: created.is_some(),
            cursor: 0,
            start_cursor: 0,
            started: Instant::now(),
            written: 0,
            abort: false,
            switching: false,
            created,
            locks,
        });
        st.last = None;
        self.cv.notify_all();
        Ok(())
    }

    /// Resumes the migration recorded in the metadata, if any (read-write mount).
    pub fn resume(&self, d: &Durability, meta: &Mutex<Meta>) -> Result<()> {
        let meta = meta.lock().unwrap_or_else(|p| p.into_inner());
        let Some(image) = meta.super_value(K_IMAGE)? else {
            return Ok(());
        };
        let which = Which::parse(&image)
            .ok_or_else(|| Error::Corrupt(format!("super row {K_IMAGE} = {image:?}")))?;
        let target = meta
            .super_value(K_TARGET)?
            .ok_or_else(|| Error::Corrupt(format!("super row {K_TARGET} missing")))?;
        let from = meta.super_value(K_FROM)?.unwrap_or_default();
        let mark: u64 = meta
            .super_value(K_MARK)?
            .and_then(|m| m.parse().ok())
            .unwrap_or(0)
            .min(self.tracks);
        drop(meta);
        let places = self.lock().places.clone();
        let opened = self
            .target_locks(which, &target, &places)
            .and_then(|locks| {
                let size = self.image(which).len();
                let (tv, _) = open_target(&target, size, true)?;
                self.image(which).start(Arc::from(tv))?;
                Ok(locks)
            });
        let locks = match opened {
            Ok(l) => l,
            Err(e) => {
                // The source is complete and current: give the migration up.
                log::error!(
                    "migration of the {} image to {target}: cannot resume ({e}); aborted, the image stays at {from}",
                    which.name()
                );
                d.commit_record(&mut |m: &Meta| clear_rows(m))?;
                self.lock().last = Some(format!(
                    "aborted image={} target={} error={}",
                    which.name(),
                    quote(&target),
                    quote(&format!("cannot resume: {e}"))
                ));
                return Ok(());
            }
        };
        log::info!(
            "migration of the {} image from {from} to {target} resumes: tracks below {mark} are verified, the rest copied",
            which.name()
        );
        let mut st = self.lock();
        st.job = Some(Job {
            which,
            created: (!volfile::is_uri(Path::new(&target))
                && std::fs::metadata(&target).is_ok_and(|m| m.is_file()))
            .then(|| PathBuf::from(&target)),
            target,
            from,
            verify_below: mark,
            fresh: false,
            cursor: 0,
            start_cursor: 0,
            started: Instant::now(),
            written: 0,
            abort: false,
            switching: false,
            locks,
        });
        self.cv.notify_all();
        Ok(())
    }

    /// Asks the running migration to stop and return to the source.
    pub fn abort(&self) -> Result<()> {
        let mut st = self.lock();
        match st.job.as_mut() {
            Some(j) => {
                j.abort = true;
                self.cv.notify_all();
                Ok(())
            }
            None => Err(Error::invalid("no migration is running")),
        }
    }

    /// Stops the thread (unmount); a running migration stays recorded and resumes at
    /// the next mount.
    pub fn stop(&self) {
        self.lock().stop = true;
        self.cv.notify_all();
    }

    /// True while a migration runs.
    pub fn running(&self) -> bool {
        self.lock().job.is_some()
    }

    /// The state line of `user.pairfs.migration`: `none`, `migrating ...`,
    /// `migrated ...` or `aborted ...`.
    pub fn status_line(&self) -> String {
        let st = self.lock();
        let Some(j) = &st.job else {
            return st.last.clone().unwrap_or_else(|| "none".into());
        };
        let ts = self.track_size;
        let done = j.cursor * ts;
        let total = self.tracks * ts;
        let secs = j.started.elapsed().as_secs_f64();
        let rate = if secs > 0.0 {
            ((j.cursor - j.start_cursor) * ts) as f64 / secs
        } else {
            0.0
        };
        let eta = if rate > 0.0 {
            format!(" eta_s={:.0}", (total - done) as f64 / rate)
        } else {
            String::new()
        };
        let err = self
            .image(j.which)
            .target_error()
            .map_or_else(String::new, |e| format!(" error={}", quote(&e)));
        format!(
            "migrating image={} progress={:.1}% copied_bytes={done} total_bytes={total} written_bytes={} rate_bps={:.0}{eta} from={} target={}{}{}",
            j.which.name(),
            done as f64 * 100.0 / total.max(1) as f64,
            j.written,
            rate,
            quote(&j.from),
            quote(&j.target),
            if j.switching {
                " phase=switching"
            } else if j.cursor < j.verify_below {
                " phase=verify"
            } else {
                ""
            },
            err
        )
    }

    /// The migration thread: waits for a job, copies, switches. `on_switch` is told the
    /// new location of an image after its switch.
    pub fn run(&self, d: &Durability, on_switch: &dyn Fn(Which, &Path)) {
        loop {
            let mut st = self.lock();
            while !st.stop && st.job.is_none() {
                st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            if st.stop {
                drop(st);
                self.park(d);
                return;
            }
            drop(st);
            self.run_job(d, on_switch);
        }
    }

    /// At unmount: commit the mark of a running migration (it resumes at next mount),
    /// or abort a failed one.
    fn park(&self, d: &Durability) {
        let (which, cursor) = {
            let st = self.lock();
            match &st.job {
                Some(j) => (j.which, j.cursor),
                None => return,
            }
        };
        if self.image(which).target_error().is_some() {
            self.finish_abort(d, None);
            return;
        }
        if self.image(which).sync_target().is_ok() {
            let mark = cursor.to_string();
            let _ = d.commit_record(&mut |m: &Meta| m.set_super_values(&[(K_MARK, Some(&mark))]));
        }
    }

    fn run_job(&self, d: &Durability, on_switch: &dyn Fn(Which, &Path)) {
        let ts = self.track_size;
        let per_batch = (BATCH_BYTES / ts).max(1);
        let per_mark = (MARK_BYTES / ts).max(1);
        let per_sync = (SYNC_BYTES / ts).max(1);
        let (which, verify_below, fresh) = {
            let st = self.lock();
            let j = st.job.as_ref().expect("job");
            (j.which, j.verify_below, j.fresh)
        };
        let img = self.image(which).clone();
        let mut cursor = 0u64;
        let mut last_mark = 0u64;
        let t0 = Instant::now();
        loop {
            if let Some(bps) = self.bps {
                let due = Duration::from_secs_f64((cursor * ts) as f64 / bps as f64);
                if let Some(wait) = due.checked_sub(t0.elapsed()) {
                    std::thread::sleep(wait.min(Duration::from_millis(200)));
                    continue;
                }
            }
            {
                let st = self.lock();
                if st.stop {
                    return;
                }
                if st.job.as_ref().is_some_and(|j| j.abort) {
                    drop(st);
                    self.finish_abort(d, Some("aborted by the operator".into()));
                    return;
                }
            }
            if let Some(e) = img.target_error() {
                self.finish_abort(d, Some(e));
                return;
            }
            if d.meta_failed() {
                // Nothing commits until remount; the record resumes then.
                self.idle_until_stop();
                return;
            }
            if cursor >= self.tracks {
                break;
            }
            let n = per_batch.min(self.tracks - cursor);
            let verify = cursor < verify_below;
            match img.copy_batch(cursor * ts, n * ts, verify, fresh) {
                Ok(w) => {
                    cursor += n;
                    let mut st = self.lock();
                    if let Some(j) = st.job.as_mut() {
                        j.cursor = cursor;
                        j.written += w;
                    }
                }
                Err(e) => {
                    let msg = img.target_error().unwrap_or_else(|| e.to_string());
                    self.finish_abort(d, Some(msg));
                    return;
                }
            }
            if cursor.is_multiple_of(per_sync)
                && cursor - last_mark < per_mark
                && let Err(e) = img.sync_target()
            {
                self.finish_abort(d, Some(e.to_string()));
                return;
            }
            if cursor - last_mark >= per_mark && cursor < self.tracks && cursor > verify_below {
                if let Err(e) = img.sync_target() {
                    self.finish_abort(d, Some(e.to_string()));
                    return;
                }
                let mark = cursor.to_string();
                if d.commit_record(&mut |m: &Meta| m.set_super_values(&[(K_MARK, Some(&mark))]))
                    .is_err()
                {
                    // The metadata failed: nothing commits until remount.
                    self.idle_until_stop();
                    return;
                }
                last_mark = cursor;
            }
        }
        self.switch(d, which, on_switch);
    }

    /// The switch (module doc, step 3).
    fn switch(&self, d: &Durability, which: Which, on_switch: &dyn Fn(Which, &Path)) {
        let img = self.image(which).clone();
        let (target, from) = {
            let st = self.lock();
            let j = st.job.as_ref().expect("job");
            (j.target.clone(), j.from.clone())
        };
        img.begin_switch();
        if let Err(e) = img.sync_target() {
            img.end_switch();
            self.finish_abort(d, Some(e.to_string()));
            return;
        }
        if let Some(e) = img.target_error() {
            img.end_switch();
            self.finish_abort(d, Some(e));
            return;
        }
        let r = d.commit_record(&mut |m: &Meta| {
            m.set_super_values(&[
                (which.key(), Some(&target)),
                (K_IMAGE, None),
                (K_TARGET, None),
                (K_FROM, None),
                (K_MARK, None),
            ])
        });
        if let Err(e) = r {
            // Whether or not the record reached the disk, both images stay complete as long
            // as the writes are mirrored: keep mirroring until unmount (nothing commits
            // until remount; the next mount follows whichever record is durable).
            img.end_switch();
            log::error!("migration: the switch could not be recorded: {e}");
            self.idle_until_stop();
            return;
        }
        if let Some(ms) = std::env::var("PAIRFS_MIGRATE_SWITCH_PAUSE_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            // Test hook (tests/migrate.rs): a kill lands between the durable switch and
            // the swap.
            if let Some(j) = self.lock().job.as_mut() {
                j.switching = true;
            }
            log::info!("migration: switch recorded; pausing {ms} ms before the swap (test hook)");
            std::thread::sleep(Duration::from_millis(ms));
        }
        match img.finish_switch() {
            Ok(old) => {
                drop(old);
                let mut st = self.lock();
                let j = st.job.take().expect("job");
                let secs = j.started.elapsed().as_secs_f64();
                match which {
                    Which::Volume => {
                        st.places.volume = PathBuf::from(&target);
                        st.held.extend(j.locks);
                    }
                    // The snapshot locks: the source's and target's end here; snapshot
                    // mounts now lock the new place.
                    Which::Copy => st.places.copy = PathBuf::from(&target),
                }
                st.last = Some(format!(
                    "migrated image={} progress=100.0% elapsed_s={secs:.1} from={} target={}",
                    which.name(),
                    quote(&from),
                    quote(&target)
                ));
                drop(st);
                log::info!(
                    "migration of the {} image done in {secs:.1} s: it is now at {target} (recorded in the metadata; {from} is no longer used)",
                    which.name()
                );
                on_switch(which, Path::new(&target));
            }
            Err(e) => {
                // A target write failed after the target's last sync: record the
                // source again (no sync returned meanwhile, so nothing acknowledged is
                // missing from the target if a crash comes first).
                let _ = d.commit_record(&mut |m: &Meta| {
                    m.set_super_values(&[(which.key(), Some(&from))])
                });
                self.finish_abort(d, Some(e.to_string()));
            }
        }
    }

    /// Waits for unmount (the job stays recorded and resumes at the next mount).
    fn idle_until_stop(&self) {
        let mut st = self.lock();
        while !st.stop {
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Aborts the job: clears the record, drops the target, removes a target file we
    /// created.
    fn finish_abort(&self, d: &Durability, why: Option<String>) {
        // The job stays (status: still migrating) until the abort is done, then goes with
        // the final state set in the same step.
        let Some((which, target, from, created)) = self
            .lock()
            .job
            .as_ref()
            .map(|j| (j.which, j.target.clone(), j.from.clone(), j.created.clone()))
        else {
            return;
        };
        if let Err(e) = d.commit_record(&mut |m: &Meta| clear_rows(m)) {
            log::error!("migration abort: {e}");
        }
        self.image(which).abort();
        if let Some(p) = &created {
            let _ = std::fs::remove_file(p);
        }
        let why = why.unwrap_or_else(|| "aborted".into());
        log::warn!(
            "migration of the {} image to {target} aborted: {why}; it stays at {from}",
            which.name(),
        );
        let mut st = self.lock();
        let j = st.job.take();
        st.last = Some(format!(
            "aborted image={} from={} target={} error={}",
            which.name(),
            quote(&from),
            quote(&target),
            quote(&why)
        ));
        drop(st);
        drop(j);
    }

    /// Waits until no migration runs or `timeout` passes (tests, `--wait`).
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.running() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }
}

fn clear_rows(m: &Meta) -> Result<()> {
    m.set_super_values(&[
        (K_IMAGE, None),
        (K_TARGET, None),
        (K_FROM, None),
        (K_MARK, None),
    ])
}
