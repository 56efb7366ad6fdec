//! The secondary's copy mount (`pairfs replica serve VOLUME --copy-mount DIR`): the
//! frozen copies the secondary holds, served read-only while it applies the primary's
//! record stream — backups read them at the second site.
//!
//! Why the last committed state can be served while records keep arriving: the stream
//! carries the primary's writes in the order it makes them durable, so at every record
//! boundary the secondary is a state the primary could have crashed into, and the
//! primary's order of writes (docs/design.md, rules 2, 8a and 14) keeps every frozen
//! copy whole in every such state: an old track reaches the copy image, and the commit
//! that says so, before the new data reaches the volume image. So the data a committed
//! state `N` reads for its frozen copies (copied tracks from the copy image, tracks not
//! copied yet from the volume image) stays in place until a later commit changes what
//! state `N` says; writes between commits never touch it.
//!
//! Hence the gate ([`Follower`]): a copy-mount request runs under a shared hold of it,
//! with a read-only [`Fs`] opened from the committed state of that moment; the secondary
//! applies each `Commit` record (and anything that replaces the database) under the
//! exclusive hold, so no request spans a commit. The first request after a commit opens
//! the new state (the database is read, not copied; the extent table is not scanned)
//! and takes over the previous view's inode numbering, the object lists of every pair
//! and generation whose instant did not change, and the view itself when the frozen set
//! did not change ([`crate::snap::engine::Engine::adopt_view`]): a busy primary committing
//! every second costs a reopen, not a walk of every frozen tree, and a split or refresh
//! of one generation walks that one. When the frozen set changed, the kernel's cached
//! top-level names are dropped.
//!
//! Nothing is served while the images are not consistent: before the first full sync,
//! during a full sync or an online resync, and on an old primary served with `--rejoin`
//! until it is a replica in sync: requests fail with `EAGAIN` (a backup retries later;
//! it never reads a half-synced copy).
//!
//! Costs: the primary's commits wait for running copy-mount requests (one FUSE request
//! each, e.g. a 128 KiB read) and for the reopen after a commit (measured in
//! docs/replication.md).

use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, RwLock};

use fuser::Errno;

use crate::core::fs::{Fs, Options};
use crate::core::volfile::{self, Paths};
use crate::fuse::copy_fs::Source;
use crate::snap::pair::PairId;

/// What the gate guards: which committed state is current, and whether there is one.
struct Gate {
    /// Bumped by every change the secondary applies under the exclusive hold.
    epoch: u64,
    /// `None`: the copies can be served; `Some(why)`: not now.
    closed: Option<&'static str>,
}

/// The state a request was last served from.
struct Opened {
    epoch: u64,
    fs: Arc<Fs>,
    identity: Vec<(PairId, i64)>,
    top: Vec<Vec<u8>>,
}

/// The secondary's copy-mount source: a read-only [`Fs`] of the last committed state.
pub struct Follower {
    paths: Paths,
    gate: RwLock<Gate>,
    cur: Mutex<Option<Opened>>,
    /// Top-level names to drop from the kernel's cache after a change of the frozen set.
    inval: Mutex<Option<Sender<Vec<Vec<u8>>>>>,
}

impl Follower {
    /// A source for the volume at `paths`; closed (serving nothing) with reason `closed`
    /// until [`Follower::open_gate`].
    pub fn new(paths: Paths, closed: Option<&'static str>) -> Arc<Follower> {
        Arc::new(Follower {
            paths,
            gate: RwLock::new(Gate { epoch: 1, closed }),
            cur: Mutex::new(None),
            inval: Mutex::new(None),
        })
    }

    /// Where to send the top-level names of the old and the new view after a change.
    pub fn set_invalidator(&self, tx: Sender<Vec<Vec<u8>>>) {
        *self.inval.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
    }

    /// Runs `f` (an applied commit) with no copy-mount request running; the next
    /// request opens the state `f` left.
    pub fn change<T>(&self, f: impl FnOnce() -> T) -> T {
        let mut g = self.gate.write().unwrap_or_else(|p| p.into_inner());
        let r = f();
        g.epoch += 1;
        r
    }

    /// Stops serving (`why` goes to the log of refused requests) before the images or
    /// the database stop being a consistent volume; waits for running requests.
    pub fn close_gate(&self, why: &'static str) {
        let mut g = self.gate.write().unwrap_or_else(|p| p.into_inner());
        if g.closed.is_none() {
            log::info!("replica: copy mount closed: {why}");
        }
        g.closed = Some(why);
        g.epoch += 1;
        // The old state's files are about to be replaced: let it go now.
        *self.cur.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Serves again: the volume is consistent (a full sync or a resync ended).
    pub fn open_gate(&self) {
        let mut g = self.gate.write().unwrap_or_else(|p| p.into_inner());
        if g.closed.is_some() {
            log::info!("replica: copy mount serves the frozen copies again");
        }
        g.closed = None;
        g.epoch += 1;
    }

    /// The state of `epoch`, opened now if the last one is older.
    fn current(&self, epoch: u64) -> crate::Result<Arc<Fs>> {
        let mut cur = self.cur.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(o) = cur.as_ref()
            && o.epoch == epoch
        {
            return Ok(o.fs.clone());
        }
        let opts = Options {
            readonly: true,
            no_allocator: true,
            ..Options::default()
        };
        let t = std::time::Instant::now();
        let fs = Arc::new(volfile::open_unlocked(&self.paths, opts)?);
        let identity = fs.engine.frozen_identity();
        let old = cur.take();
        let same = old.as_ref().is_some_and(|o| o.identity == identity);
        let top = match &old {
            Some(o) => {
                fs.engine.adopt_view(&o.fs.engine, same);
                if same {
                    o.top.clone()
                } else {
                    fs.engine.top_names(&*fs)
                }
            }
            None => fs.engine.top_names(&*fs),
        };
        if !same
            && let Some(o) = &old
            && let Some(tx) = self
                .inval
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
        {
            let mut names = o.top.clone();
            names.extend(top.iter().cloned());
            let _ = tx.send(names);
        }
        log::debug!(
            "replica: copy mount opened committed state {epoch} in {} us ({})",
            t.elapsed().as_micros(),
            if same {
                "same frozen set, view kept"
            } else {
                "frozen set changed"
            }
        );
        *cur = Some(Opened {
            epoch,
            fs: fs.clone(),
            identity,
            top,
        });
        Ok(fs)
    }
}

impl Follower {
    /// The secondary's state for `user.pairfs.replica` of the copy mount's root: whether
    /// the copies are served (or why not) and where the replica stands, from its
    /// database's `super` rows (`key=value` words, as the primary's link line).
    pub fn describe(&self) -> String {
        let (closed, epoch) = {
            let g = self.gate.read().unwrap_or_else(|p| p.into_inner());
            (g.closed, g.epoch)
        };
        let mut line = match closed {
            None => format!("serving state={epoch}"),
            Some(why) => format!("closed reason={why:?}"),
        };
        let rows = rusqlite::Connection::open_with_flags(
            &self.paths.meta,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .and_then(|c| {
            let mut st = c.prepare(
                "SELECT key, value FROM super WHERE key IN \
                 ('replica_of', 'repl_stream', 'repl_seq', 'repl_inconsistent') ORDER BY key",
            )?;
            let rows: Vec<(String, String)> = st
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<_>>()?;
            Ok(rows)
        });
        match rows {
            Ok(rows) => {
                for (k, v) in rows {
                    let v = match k.as_str() {
                        "repl_stream" => v.parse::<u64>().map_or(v.clone(), |n| format!("{n:x}")),
                        _ => v,
                    };
                    line.push_str(&format!(" {k}={v}"));
                }
            }
            Err(e) => line.push_str(&format!(" database={:?}", e.to_string())),
        }
        line
    }
}

impl Source for Arc<Follower> {
    fn describe(&self) -> Option<String> {
        Some(Follower::describe(self))
    }

    fn with_fs(&self, f: &mut dyn FnMut(&Fs)) -> Result<(), Errno> {
        let g = self.gate.read().unwrap_or_else(|p| p.into_inner());
        if let Some(why) = g.closed {
            log::debug!("replica: copy-mount request refused: {why}");
            return Err(Errno::EAGAIN);
        }
        match self.current(g.epoch) {
            Ok(fs) => {
                f(&fs);
                Ok(())
            }
            Err(e) => {
                log::warn!("replica: copy mount: opening the committed state: {e}");
                Err(Errno::from_i32(e.errno()))
            }
        }
    }
}
