//! Power-loss simulation of the whole core: the volume and copy image are
//! [`CrashVolume`]s that keep unsynced writes apart; the metadata database is a real
//! SQLite file (WAL, `synchronous=FULL`), so a crash keeps exactly its committed
//! transactions. After every operation of random workloads (writes, fsyncs, truncates,
//! punches, unlinks, splits, updates, resyncs, releases, copier rounds, destage rounds of
//! staged copy-on-write writes, fdatasyncs) a crash image is
//! built in which a random subset of the unsynced image writes reached the disk, in a
//! random order; it is then mounted (recovery), and checked:
//!
//! - every frozen copy whose split/update returned reads exactly its instant's content,
//!   before and after the copier resumes and finishes;
//! - every file unchanged since the last fsync/commit reads back exactly;
//! - no pair is left in error; fsck is clean.
//!
//! `PAIRFS_CRASH_SEED` and `PAIRFS_CRASH_WORKLOADS` reproduce or lengthen a run.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use pairfs::core::fs::{Ctx, Fs, Options, ROOT};
use pairfs::core::volfile::{self, Paths};
use pairfs::meta::{Geometry, Meta};
use pairfs::snap::engine::Op;
use pairfs::store::volume::{CrashVolume, Volume};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const TS: u64 = 4096;
const VOL: u64 = 512 * TS; // 2 MiB, 512 tracks
const FILES: usize = 4;

fn new_volume(dir: &Path) -> (Paths, Geometry, Arc<CrashVolume>, Arc<CrashVolume>) {
    let paths = Paths::new(&dir.join("v"), None, None);
    volfile::mkfs(&paths, VOL, TS, false).unwrap();
    let vol = Arc::new(CrashVolume::new(std::fs::read(&paths.volume).unwrap()));
    let copy = Arc::new(CrashVolume::new(std::fs::read(&paths.copy).unwrap()));
    let g = Meta::open(&paths.meta, true).unwrap().geometry().clone();
    (paths, g, vol, copy)
}

fn open_fs(paths: &Paths, vol: Box<dyn Volume>, copy: Box<dyn Volume>) -> Fs {
    let meta = Meta::open(&paths.meta, false).unwrap();
    let loaded = meta.load().unwrap();
    meta.set_clean(false).unwrap();
    let opts = Options {
        meta_path: Some(paths.meta.clone()),
        ..Options::default()
    };
    Fs::new(meta, loaded, vol, copy, opts).unwrap()
}

fn name(i: usize) -> Vec<u8> {
    format!("f{i}").into_bytes()
}

fn read_file(fs: &Fs, ino: u64) -> Vec<u8> {
    let size = fs.getattr(ino).unwrap().row.size;
    let mut out = Vec::new();
    while (out.len() as u64) < size {
        let d = fs.read(ino, out.len() as u64, 1 << 20).unwrap();
        assert!(!d.is_empty());
        out.extend(d);
    }
    out
}

fn read_frozen(fs: &Fs, ino: u64) -> Option<Vec<u8>> {
    let (pair, idx, f) = fs
        .engine
        .frozen_objects(&*fs)
        .into_iter()
        .find(|o| o.2.ino == ino)?;
    let mut out = Vec::new();
    while (out.len() as u64) < f.attr.size {
        let d = fs
            .engine
            .read_frozen(&*fs, pair, idx, out.len() as u64, 1 << 20)
            .unwrap();
        assert!(!d.is_empty());
        out.extend(d);
    }
    Some(out)
}

/// What must hold after a crash now.
struct Expect {
    frozen: BTreeMap<u64, Vec<u8>>,
    durable: Vec<(Vec<u8>, Vec<u8>)>,
}

fn copy_db(paths: &Paths, to: &Paths) {
    for ext in ["", "-wal"] {
        let mut from = paths.meta.clone().into_os_string();
        from.push(ext);
        let mut dest = to.meta.clone().into_os_string();
        dest.push(ext);
        let _ = std::fs::remove_file(&dest);
        if Path::new(&from).exists() {
            std::fs::copy(&from, &dest).unwrap();
        }
    }
    let mut shm = to.meta.clone().into_os_string();
    shm.push("-shm");
    let _ = std::fs::remove_file(shm);
}

#[allow(clippy::too_many_arguments)]
fn check_crash(
    seed: u64,
    point: usize,
    cdir: &Path,
    paths: &Paths,
    vol: &CrashVolume,
    copy: &CrashVolume,
    exp: &Expect,
    rng: &mut Rng,
) {
    let cp = Paths::new(&cdir.join("v"), None, None);
    copy_db(paths, &cp);
    let bits = rng.next();
    let rev = rng.below(2) == 0;
    let mut k = 0u32;
    let mut keep = |_i: usize| {
        k = k.wrapping_add(1);
        (bits.rotate_left(k) & 1) == 1
    };
    std::fs::write(&cp.volume, vol.crash_image(&mut keep, rev)).unwrap();
    let mut k2 = 7u32;
    let mut keep2 = |_i: usize| {
        k2 = k2.wrapping_add(3);
        (bits.rotate_left(k2) & 1) == 1
    };
    std::fs::write(&cp.copy, copy.crash_image(&mut keep2, !rev)).unwrap();
    let ctx = format!("seed {seed:#x} crash point {point}");
    {
        let (fs, _lock) = volfile::open(&cp, Options::default())
            .unwrap_or_else(|e| panic!("{ctx}: the crash image does not mount: {e}"));
        for (ino, want) in &exp.frozen {
            let got = read_frozen(&fs, *ino)
                .unwrap_or_else(|| panic!("{ctx}: frozen copy of inode {ino} lost"));
            assert!(
                got == *want,
                "{ctx}: frozen copy of inode {ino} differs after the crash"
            );
        }
        for (n, want) in &exp.durable {
            let a = fs.lookup(ROOT, n).unwrap_or_else(|e| {
                panic!("{ctx}: fsync'd {:?} lost: {e}", String::from_utf8_lossy(n))
            });
            assert!(
                read_file(&fs, a.row.ino) == *want,
                "{ctx}: fsync'd {:?} differs",
                String::from_utf8_lossy(n)
            );
        }
        let mut cursors = BTreeMap::new();
        for _ in 0..10_000 {
            if fs.engine.copy_round(&fs, &mut cursors) == 0 {
                break;
            }
        }
        for s in fs.engine.all_status(&fs) {
            assert!(
                matches!(s.state, "split" | "formed"),
                "{ctx}: pair {} did not finish after recovery: {}",
                s.id,
                s.line()
            );
        }
        for (ino, want) in &exp.frozen {
            let got = read_frozen(&fs, *ino).unwrap();
            assert!(
                got == *want,
                "{ctx}: frozen copy of inode {ino} differs after the copier finished"
            );
        }
        fs.shutdown().unwrap();
    }
    let r = pairfs::cli::fsck::fsck(&cp, false).unwrap();
    assert!(r.problems.is_empty(), "{ctx}: fsck: {:?}", r.problems);
}

fn workload(seed: u64, ops: usize) -> (usize, u64) {
    let dir = tempfile::tempdir_in(
        std::env::var("PAIRFS_TEST_DIR").unwrap_or_else(|_| "/dev/shm".into()),
    )
    .unwrap();
    let cdir = dir.path().join("crash");
    std::fs::create_dir(&cdir).unwrap();
    let (paths, _g, vol, copy) = new_volume(dir.path());
    let fs = open_fs(&paths, Box::new(vol.clone()), Box::new(copy.clone()));
    let mut rng = Rng(seed);
    let ctx = Ctx::default();
    // Model: name -> (ino, content, changed since last commit).
    let mut files: HashMap<usize, (u64, Vec<u8>, bool)> = HashMap::new();
    let mut frozen: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut cursors = BTreeMap::new();
    let mut points = 0;
    for i in 0..FILES {
        let a = fs
            .create_node(ctx, ROOT, &name(i), libc::S_IFREG | 0o644, 0, None)
            .unwrap();
        files.insert(i, (a.row.ino, Vec::new(), true));
    }
    let mut token = 1u8;
    for _ in 0..ops {
        let i = rng.below(FILES as u64) as usize;
        let commit_all = |files: &mut HashMap<usize, (u64, Vec<u8>, bool)>| {
            for f in files.values_mut() {
                f.2 = false;
            }
        };
        match rng.below(17) {
            0..=5 => {
                let Some(f) = files.get_mut(&i) else { continue };
                let off = rng.below(40 * TS);
                let len = 1 + rng.below(3 * TS) as usize;
                token = token.wrapping_add(1).max(1);
                let data = vec![token; len];
                match fs.write(f.0, off, &data) {
                    Ok(_) => {
                        let end = off as usize + len;
                        if f.1.len() < end {
                            f.1.resize(end, 0);
                        }
                        f.1[off as usize..end].copy_from_slice(&data);
                        f.2 = true;
                    }
                    Err(e) => assert_eq!(e.errno(), libc::ENOSPC, "write: {e}"),
                }
            }
            6 => {
                let Some(f) = files.get_mut(&i) else { continue };
                let n = rng.below(f.1.len() as u64 + 1);
                fs.truncate(f.0, n).unwrap();
                f.1.truncate(n as usize);
                f.2 = true;
            }
            7 => {
                let Some(f) = files.get_mut(&i) else { continue };
                if f.1.is_empty() {
                    continue;
                }
                let off = rng.below(f.1.len() as u64);
                let len = 1 + rng.below(3 * TS);
                fs.fallocate(
                    f.0,
                    off,
                    len,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                )
                .unwrap();
                let end = ((off + len) as usize).min(f.1.len());
                f.1[off as usize..end].fill(0);
                f.2 = true;
            }
            8 => {
                fs.commit(Vec::new()).unwrap();
                commit_all(&mut files);
            }
            9 => {
                if files.remove(&i).is_some() {
                    fs.unlink(ROOT, &name(i), false).unwrap();
                    // Recreate at once so the slot keeps being exercised.
                    let a = fs
                        .create_node(ctx, ROOT, &name(i), libc::S_IFREG | 0o644, 0, None)
                        .unwrap();
                    files.insert(i, (a.row.ino, Vec::new(), true));
                }
            }
            10 | 11 => {
                let Some(f) = files.get(&i) else { continue };
                let (ino, content) = (f.0, f.1.clone());
                if fs.control(ino, Op::Split).is_ok() {
                    frozen.insert(ino, content);
                    commit_all(&mut files);
                }
            }
            12 => {
                let Some(f) = files.get(&i) else { continue };
                let (ino, content) = (f.0, f.1.clone());
                if fs.control(ino, Op::Update).is_ok() {
                    frozen.insert(ino, content);
                    commit_all(&mut files);
                }
            }
            13 => {
                let Some(f) = files.get(&i) else { continue };
                let ino = f.0;
                let op = if rng.below(2) == 0 {
                    Op::Resync
                } else {
                    Op::Release
                };
                if fs.control(ino, op).is_ok() {
                    frozen.remove(&ino);
                    commit_all(&mut files);
                }
            }
            16 => {
                // fdatasync of one file: its data (and, if its shape changed, everything)
                // is durable.
                let Some(f) = files.get_mut(&i) else { continue };
                fs.fsync(f.0, true).unwrap();
                f.2 = false;
            }
            14 => {
                // A destage round on its own (staged copy-on-write writes reach the
                // volume after the old tracks are durable on the copy): a crash point.
                fs.engine.destage(&fs).unwrap();
            }
            _ => {
                fs.engine.copy_round(&fs, &mut cursors);
            }
        }
        // The live view (staged writes included) always reads what was written.
        if let Some(f) = files.get(&i) {
            assert_eq!(
                read_file(&fs, f.0),
                f.1,
                "seed {seed:#x}: live read of file {i} differs from what was written"
            );
        }
        // Frozen copies of unlinked files stay (pinned); drop the ones whose pair is gone.
        let live: Vec<u64> = fs
            .engine
            .frozen_objects(&fs)
            .iter()
            .map(|o| o.2.ino)
            .collect();
        frozen.retain(|ino, _| live.contains(ino));
        let exp = Expect {
            frozen: frozen.clone(),
            durable: files
                .iter()
                .filter(|(_, f)| !f.2)
                .map(|(i, f)| (name(*i), f.1.clone()))
                .collect(),
        };
        check_crash(seed, points, &cdir, &paths, &vol, &copy, &exp, &mut rng);
        points += 1;
    }
    let staged = fs
        .engine
        .staged_total
        .load(std::sync::atomic::Ordering::Relaxed);
    (points, staged)
}

#[test]
fn power_loss_at_every_step_keeps_frozen_copies_and_fsynced_data() {
    let base: u64 = std::env::var("PAIRFS_CRASH_SEED")
        .ok()
        .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok())
        .unwrap_or(0x5eed_0001);
    let workloads: u64 = std::env::var("PAIRFS_CRASH_WORKLOADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let mut points = 0;
    let mut staged = 0;
    for w in 0..workloads {
        let seed = base.wrapping_add(w.wrapping_mul(0x9E3779B97F4A7C15)) | 1;
        println!("crash workload {w}: seed {seed:#x}");
        let (p, s) = workload(seed, 40);
        points += p;
        staged += s;
    }
    println!(
        "power-loss test: {workloads} workloads, {points} crash points, {staged} staged \
         copy-on-write tracks, 0 losses"
    );
    assert!(
        staged > 0 || workloads < 5,
        "no write was staged: the test lost its point"
    );
    assert!(points >= 1000 || workloads < 25);
}
