//! The durability pipeline's failure rules, one test per defect found by reading the
//! code (issue 9, item 5). Each fails on the code before the pipeline.
//!
//! - a second `sync` caller must not return Ok while the first fsync may still fail;
//! - a failed commit keeps the pairs' bitmap chunks dirty, refuses later commits and
//!   never lets a clean flag be written;
//! - a failed copy-image sync fails every pair, not only the one whose copy-on-write
//!   synced;
//! - releasing a directory pair hands its members inside another pair's scope to that
//!   pair with their tracks recorded, so the rebuilt membership at the next mount does
//!   not claim tracks it never copied; a clean unmount records the tracks of a file the
//!   rebuild moves to another pair, and mount drops the bits of tracks a pair's members
//!   no longer map (else its copier writes over another pair's frozen copy);
//! - a further [`DurabilitySink`] (a replica later) gets every sync and commit in order.
//!
//! [`DurabilitySink`]: pairfs::core::durability::DurabilitySink

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use pairfs::core::fs::{Ctx, Fs, Options, ROOT};
use pairfs::error::{Error, Result};
use pairfs::meta::{Geometry, Meta};
use pairfs::snap::engine::Op;
use pairfs::store::volume::{Checked, FaultVolume, Faults, MemVolume, Volume};

const TS: u64 = 4096;

type Img = Arc<FaultVolume<MemVolume>>;

fn geometry(tracks: u64) -> Geometry {
    Geometry {
        uuid: "0123456789abcdef0123456789abcdef".into(),
        size: tracks * TS,
        track_size: TS,
    }
}

fn open(path: &Path, vol: &Img, copy: &Img) -> Fs {
    let meta = Meta::open(path, false).unwrap();
    let loaded = meta.load().unwrap();
    meta.set_clean(false).unwrap();
    Fs::new(
        meta,
        loaded,
        Box::new(vol.clone()),
        Box::new(copy.clone()),
        Options::default(),
    )
    .unwrap()
}

fn rig(tracks: u64) -> (tempfile::TempDir, PathBuf, Img, Img, Fs) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m");
    drop(Meta::create(&path, &geometry(tracks), 0).unwrap());
    let vol = Arc::new(FaultVolume::new(MemVolume::new((tracks * TS) as usize)));
    let copy = Arc::new(FaultVolume::new(MemVolume::new((tracks * TS) as usize)));
    let fs = open(&path, &vol, &copy);
    (dir, path, vol, copy, fs)
}

fn node(fs: &Fs, parent: u64, name: &str, kind: u32) -> u64 {
    fs.create_node(
        Ctx::default(),
        parent,
        name.as_bytes(),
        kind | 0o755,
        0,
        None,
    )
    .unwrap()
    .row
    .ino
}

fn state(fs: &Fs, ino: u64) -> String {
    fs.engine
        .status_of(fs, ino)
        .unwrap()
        .map(|s| s.line())
        .unwrap_or_default()
}

fn frozen(fs: &Fs, ino: u64) -> Option<Vec<u8>> {
    let (p, i, f) = fs
        .engine
        .frozen_objects(fs)
        .into_iter()
        .find(|o| o.2.ino == ino)?;
    Some(
        fs.engine
            .read_frozen(fs, p, i, 0, f.attr.size as u32)
            .unwrap(),
    )
}

/// A volume whose first sync blocks until released and then fails.
struct SlowFailingSync {
    inner: MemVolume,
    syncs: AtomicU32,
    state: Mutex<(bool, bool)>, // (entered, released)
    cv: Condvar,
}

impl Volume for SlowFailingSync {
    fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        self.inner.read_at(off, buf)
    }
    fn write_at(&self, off: u64, buf: &[u8]) -> Result<()> {
        self.inner.write_at(off, buf)
    }
    fn discard(&self, off: u64, len: u64) -> Result<()> {
        self.inner.discard(off, len)
    }
    fn sync(&self) -> Result<()> {
        if self.syncs.fetch_add(1, Ordering::SeqCst) > 0 {
            return self.inner.sync();
        }
        let mut g = self.state.lock().unwrap();
        g.0 = true;
        self.cv.notify_all();
        while !g.1 {
            g = self.cv.wait(g).unwrap();
        }
        Err(Error::io(
            "volume",
            std::io::Error::from_raw_os_error(libc::EIO),
        ))
    }
    fn len(&self) -> u64 {
        self.inner.len()
    }
}

#[test]
fn a_second_sync_does_not_return_ok_while_the_first_fsync_can_still_fail() {
    let v = Arc::new(SlowFailingSync {
        inner: MemVolume::new(8192),
        syncs: AtomicU32::new(0),
        state: Mutex::new((false, false)),
        cv: Condvar::new(),
    });
    let c = Arc::new(Checked::new(Box::new(v.clone()), "volume"));
    c.write_at(0, b"first").unwrap();
    let c1 = c.clone();
    let first = std::thread::spawn(move || c1.sync());
    {
        let mut g = v.state.lock().unwrap();
        while !g.0 {
            g = v.cv.wait(g).unwrap();
        }
    }
    // The first fsync runs (and covers this write too, which completed before it).
    let (tx, rx) = mpsc::channel();
    let c2 = c.clone();
    let second = std::thread::spawn(move || tx.send(c2.sync().is_ok()).unwrap());
    let early = rx.recv_timeout(Duration::from_millis(300));
    v.state.lock().unwrap().1 = true;
    v.cv.notify_all();
    assert!(first.join().unwrap().is_err());
    let second_ok = early.or_else(|_| rx.recv()).unwrap();
    second.join().unwrap();
    assert!(
        !second_ok,
        "the second sync returned Ok although the fsync covering its writes failed"
    );
}

#[test]
fn a_failed_commit_keeps_pair_chunks_refuses_commits_and_leaves_the_volume_unclean() {
    let (_d, path, _vol, _copy, fs) = rig(256);
    let f = node(&fs, ROOT, "f", libc::S_IFREG);
    fs.write(f, 0, &vec![1u8; 4 * TS as usize]).unwrap();
    fs.control(f, Op::Pair).unwrap();
    // Recorded in the forming bitmap, to be committed with the next batch.
    fs.write(f, 8 * TS, &vec![2u8; 2 * TS as usize]).unwrap();
    assert!(fs.engine.any_dirty());
    let db = rusqlite::Connection::open(&path).unwrap();
    db.execute_batch(
        "CREATE TRIGGER inject BEFORE INSERT ON inodes BEGIN SELECT RAISE(FAIL, 'injected'); END;",
    )
    .unwrap();
    assert!(fs.commit(Vec::new()).is_err());
    assert!(
        fs.engine.any_dirty(),
        "the bitmap chunks of the failed batch are dirty again"
    );
    // The database works again, but this mount must not commit over the lost batch.
    db.execute_batch("DROP TRIGGER inject;").unwrap();
    assert!(
        fs.commit(Vec::new()).is_err(),
        "a commit after a failed one"
    );
    assert!(fs.shutdown().is_err());
    drop(fs);
    let loaded = Meta::open(&path, true).unwrap().load().unwrap();
    assert!(
        !loaded.clean,
        "the clean flag was written after a failed commit: the next mount would not repair"
    );
}

#[test]
fn a_failed_copy_image_sync_fails_every_pair() {
    let (_d, _path, _vol, copy, fs) = rig(256);
    let a = node(&fs, ROOT, "a", libc::S_IFREG);
    let b = node(&fs, ROOT, "b", libc::S_IFREG);
    fs.write(a, 0, &vec![1u8; 8 * TS as usize]).unwrap();
    fs.write(b, 0, &vec![2u8; 8 * TS as usize]).unwrap();
    fs.control(a, Op::Split).unwrap();
    fs.control(b, Op::Split).unwrap();
    // One copier round: both pairs' tracks are on the copy image, not yet synced.
    let mut cur = std::collections::BTreeMap::new();
    fs.engine.copy_round(&fs, &mut cur);
    // A copy-on-write of `a` syncs the copy image, and the fsync fails: the kernel may
    // have dropped `b`'s unsynced pages as well.
    copy.set_faults(Faults {
        sync: true,
        ..Faults::default()
    });
    fs.write(a, 0, &vec![3u8; TS as usize]).unwrap();
    // The write was staged; the destage round syncs the copy image, and that fails.
    let _ = fs.engine.destage(&fs);
    assert!(state(&fs, a).starts_with("error"), "{}", state(&fs, a));
    assert!(
        state(&fs, b).starts_with("error"),
        "b's copies may be lost: {}",
        state(&fs, b)
    );
    // Recovery of `a` clears the image's poison; `b` must not confirm lost copies then.
    copy.set_faults(Faults::default());
    fs.control(a, Op::Update).unwrap();
    while fs.engine.copy_round(&fs, &mut cur) > 0 {}
    assert!(frozen(&fs, b).is_none());
    assert_eq!(
        frozen(&fs, a).unwrap()[..TS as usize],
        vec![3u8; TS as usize]
    );
}

#[test]
fn releasing_a_directory_pair_hands_moved_files_to_the_enclosing_pair() {
    let (_d, path, vol, copy, fs) = rig(256);
    let a = node(&fs, ROOT, "a", libc::S_IFDIR);
    let c = node(&fs, ROOT, "c", libc::S_IFDIR);
    let f = node(&fs, a, "f", libc::S_IFREG);
    fs.write(f, 0, &vec![1u8; 4 * TS as usize]).unwrap();
    fs.control(a, Op::Pair).unwrap();
    fs.control(c, Op::Pair).unwrap();
    let mut cur = std::collections::BTreeMap::new();
    while fs.engine.copy_round(&fs, &mut cur) > 0 {}
    // f moves from A's scope into C's; it stays A's until A is released.
    fs.rename(a, b"f", c, b"f", 0).unwrap();
    fs.write(f, 0, &vec![2u8; 4 * TS as usize]).unwrap();
    fs.control(a, Op::Release).unwrap();
    fs.shutdown().unwrap();
    drop(fs);
    // At the next mount C claims f (it lies beneath C).
    let fs = open(&path, &vol, &copy);
    while fs.engine.copy_round(&fs, &mut cur) > 0 {}
    fs.control(c, Op::Split).unwrap();
    while fs.engine.copy_round(&fs, &mut cur) > 0 {}
    fs.write(f, 0, &vec![3u8; 4 * TS as usize]).unwrap();
    assert_eq!(
        frozen(&fs, f).expect("f is in C's frozen copy"),
        vec![2u8; 4 * TS as usize],
        "C's frozen copy of f reads stale tracks"
    );
}

#[test]
fn a_file_moved_between_directory_pairs_is_recorded_for_the_pair_the_remount_gives_it() {
    let (_d, path, vol, copy, fs) = rig(256);
    let a = node(&fs, ROOT, "a", libc::S_IFDIR);
    let c = node(&fs, ROOT, "c", libc::S_IFDIR);
    let f = node(&fs, a, "f", libc::S_IFREG);
    fs.write(f, 0, &vec![1u8; 4 * TS as usize]).unwrap();
    fs.control(a, Op::Pair).unwrap();
    fs.control(c, Op::Pair).unwrap();
    let mut cur = std::collections::BTreeMap::new();
    while fs.engine.copy_round(&fs, &mut cur) > 0 {}
    // f moves from A's scope into C's and is rewritten; A (no frozen copy) records it.
    fs.rename(a, b"f", c, b"f", 0).unwrap();
    fs.write(f, 0, &vec![2u8; 4 * TS as usize]).unwrap();
    fs.shutdown().unwrap();
    drop(fs);
    // The next mount gives f to C, the pair whose scope holds it. C splits and f is
    // overwritten at once: only a copy-on-write keeps the split-time bytes.
    let fs = open(&path, &vol, &copy);
    fs.control(c, Op::Split).unwrap();
    fs.write(f, 0, &vec![3u8; 4 * TS as usize]).unwrap();
    while fs.engine.copy_round(&fs, &mut cur) > 0 {}
    assert_eq!(
        frozen(&fs, f).expect("f is in C's frozen copy"),
        vec![2u8; 4 * TS as usize],
        "C's frozen copy of f reads stale tracks"
    );
}

#[test]
fn after_a_crash_the_pair_a_file_left_does_not_copy_over_the_new_pairs_frozen_copy() {
    let (_d, path, vol, copy, fs) = rig(256);
    let a = node(&fs, ROOT, "a", libc::S_IFDIR);
    let c = node(&fs, ROOT, "c", libc::S_IFDIR);
    let f = node(&fs, a, "f", libc::S_IFREG);
    fs.write(f, 0, &vec![1u8; 4 * TS as usize]).unwrap();
    fs.control(a, Op::Pair).unwrap();
    fs.control(c, Op::Pair).unwrap();
    let mut cur = std::collections::BTreeMap::new();
    while fs.engine.copy_round(&fs, &mut cur) > 0 {}
    fs.rename(a, b"f", c, b"f", 0).unwrap();
    fs.write(f, 0, &vec![2u8; 4 * TS as usize]).unwrap();
    // Committed (A's bits for f's tracks are on disk), then the daemon dies.
    fs.commit(Vec::new()).unwrap();
    drop(fs);
    let fs = open(&path, &vol, &copy);
    fs.control(c, Op::Split).unwrap();
    fs.write(f, 0, &vec![3u8; 4 * TS as usize]).unwrap();
    // A's copier must not copy f's new bytes over C's frozen copy of them.
    while fs.engine.copy_round(&fs, &mut cur) > 0 {}
    assert_eq!(
        frozen(&fs, f).expect("f is in C's frozen copy"),
        vec![2u8; 4 * TS as usize],
        "C's frozen copy of f was overwritten"
    );
}

/// A sink that records what reaches it and can be told to fail its data sync.
#[derive(Default)]
struct Recorder {
    log: Mutex<Vec<String>>,
    fail_sync: std::sync::atomic::AtomicBool,
}

impl pairfs::core::durability::DurabilitySink for Recorder {
    fn name(&self) -> &str {
        "recorder"
    }
    fn sync_data(&self) -> Result<()> {
        self.log.lock().unwrap().push("sync".into());
        if self.fail_sync.load(Ordering::SeqCst) {
            return Err(Error::io(
                "replica",
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        Ok(())
    }
    fn commit_meta(&self, b: &pairfs::meta::Batch) -> Result<()> {
        self.log.lock().unwrap().push(format!(
            "commit {} inodes {} pairs",
            b.inodes.len(),
            b.pairs.len()
        ));
        Ok(())
    }
}

#[test]
fn a_further_sink_gets_every_durability_point_in_order() {
    let (_d, _path, _vol, _copy, fs) = rig(256);
    let sink = Arc::new(Recorder::default());
    fs.durability.add_sink(sink.clone());
    let f = node(&fs, ROOT, "f", libc::S_IFREG);
    fs.write(f, 0, &vec![1u8; 2 * TS as usize]).unwrap();
    fs.commit(Vec::new()).unwrap();
    assert_eq!(
        *sink.log.lock().unwrap(),
        vec!["sync".to_string(), "commit 2 inodes 0 pairs".to_string()]
    );
    // A pair-only commit (copy-on-write clears bits) reaches it too, data first.
    fs.control(f, Op::Split).unwrap();
    sink.log.lock().unwrap().clear();
    fs.write(f, 0, &vec![2u8; TS as usize]).unwrap();
    // Staged copy-on-write: the destage round syncs and commits the cleared bits.
    fs.engine.destage(&fs).unwrap();
    let log = sink.log.lock().unwrap().clone();
    assert_eq!(log.first().map(String::as_str), Some("sync"), "{log:?}");
    assert!(log.iter().any(|l| l.ends_with("1 pairs")), "{log:?}");
    // A sink whose data sync fails fails the commit, and the batch stays dirty.
    sink.fail_sync.store(true, Ordering::SeqCst);
    fs.write(f, 4 * TS, b"more").unwrap();
    assert!(fs.commit(Vec::new()).is_err());
    assert!(fs.has_dirty());
}
