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
//! - every track a frozen copy reads from the copy image has a committed checksum that
//!   matches it (`Engine::scrub`), before and after the copier finishes;
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
        .frozen_objects(fs)
        .into_iter()
        .find(|o| o.2.ino == ino)?;
    let mut out = Vec::new();
    while (out.len() as u64) < f.attr.size {
        let d = fs
            .engine
            .read_frozen(fs, pair, idx, out.len() as u64, 1 << 20)
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
    /// A lazily split directory `d`: its files at the instant (path, content, mode).
    tree: Option<Tree>,
    /// Third embodiment: the frozen files of one pair (pair id, its tree), checked
    /// apart from every other pair's objects at the same paths.
    pairs: Vec<(u64, Tree)>,
    /// A writable clone: its name, its content as of the last commit, and the writes
    /// (offset, bytes) since, any of which may have reached the disk.
    clone: Option<CloneExpect>,
    /// Named generations of `d`'s pair whose split returned: name and `d`'s files at
    /// that instant (as [`Expect::tree`]).
    gens: Vec<(String, Tree)>,
}

/// The clone of [`Expect::clone`].
struct CloneExpect {
    name: Vec<u8>,
    durable: Vec<u8>,
    since: Vec<(u64, Vec<u8>)>,
}

type Tree = BTreeMap<String, (Vec<u8>, u32)>;

/// The files of the frozen view under `d/` (path -> content, mode).
fn frozen_tree(fs: &Fs) -> Tree {
    frozen_tree_of(fs, None)
}

/// [`frozen_tree`] of one pair's objects only (`Some(id)`), or of every pair's.
fn frozen_tree_of(fs: &Fs, only: Option<u64>) -> Tree {
    frozen_tree_at(fs, only, "")
}

/// The files of generation `name` under `@name/d/` (paths without `@name/`).
fn gen_tree(fs: &Fs, name: &str) -> Tree {
    frozen_tree_at(fs, None, &format!("@{name}/"))
}

/// [`frozen_tree_of`] of the objects placed under `prefix` (stripped).
fn frozen_tree_at(fs: &Fs, only: Option<u64>, prefix: &str) -> Tree {
    let mut out = Tree::new();
    for (pair, idx, mut f) in fs.engine.frozen_objects(fs) {
        let Some(rest) = f.path.strip_prefix(prefix) else {
            continue;
        };
        f.path = rest.to_string();
        f.links = f
            .links
            .iter()
            .filter_map(|l| l.strip_prefix(prefix).map(str::to_string))
            .collect();
        if f.attr.kind != pairfs::snap::pair::FrozenKind::File
            || !f.path.starts_with("d/")
            || only.is_some_and(|p| p != pair)
        {
            continue;
        }
        let mut data = Vec::new();
        while (data.len() as u64) < f.attr.size {
            let d = fs
                .engine
                .read_frozen(fs, pair, idx, data.len() as u64, 1 << 20)
                .unwrap();
            assert!(!d.is_empty());
            data.extend(d);
        }
        for p in std::iter::once(&f.path).chain(f.links.iter()) {
            out.insert(p.clone(), (data.clone(), f.attr.perm));
        }
    }
    out
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
        if let Some(t) = &exp.tree {
            assert!(
                frozen_tree(&fs) == *t,
                "{ctx}: the lazily split directory's view differs after the crash:\n{:?}\nwant\n{:?}",
                frozen_tree(&fs).keys().collect::<Vec<_>>(),
                t.keys().collect::<Vec<_>>()
            );
        }
        for (name, t) in &exp.gens {
            let got = gen_tree(&fs, name);
            assert!(
                got == *t,
                "{ctx}: generation {name} differs after the crash:\n{:?}\nwant\n{:?}",
                got.keys().collect::<Vec<_>>(),
                t.keys().collect::<Vec<_>>()
            );
        }
        for (id, t) in &exp.pairs {
            assert!(
                frozen_tree_of(&fs, Some(*id)) == *t,
                "{ctx}: the frozen files of pair {id} differ after the crash:\n{:?}\nwant\n{:?}",
                frozen_tree_of(&fs, Some(*id)).keys().collect::<Vec<_>>(),
                t.keys().collect::<Vec<_>>()
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
        // A clone reads its committed size, and each byte its committed value or one
        // written since (never the zeros of a track mapped before its fill was durable).
        if let Some(c) = &exp.clone {
            let a = fs
                .lookup(ROOT, &c.name)
                .unwrap_or_else(|e| panic!("{ctx}: the clone is lost: {e}"));
            let got = read_file(&fs, a.row.ino);
            assert_eq!(got.len(), c.durable.len(), "{ctx}: clone size");
            for (i, (&g, &d)) in got.iter().zip(&c.durable).enumerate() {
                let ok = g == d
                    || c.since.iter().any(|(off, w)| {
                        let off = *off as usize;
                        i >= off && i < off + w.len() && w[i - off] == g
                    });
                assert!(
                    ok,
                    "{ctx}: clone byte {i} is {g}, committed {d}, never written since"
                );
            }
        }
        // Every track frozen reads take from the copy image (pending bit clear on disk)
        // has its checksum committed with it, matching the copy image's bytes.
        let sums = |when: &str| {
            let r = fs.engine.scrub(&fs).unwrap();
            assert!(
                r.bad_total == 0 && r.unsummed == 0,
                "{ctx}: {when}: copied tracks without a matching sum: {r:?}"
            );
        };
        sums("after the crash");
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
        sums("after the copier finished");
        for (ino, want) in &exp.frozen {
            let got = read_frozen(&fs, *ino).unwrap();
            assert!(
                got == *want,
                "{ctx}: frozen copy of inode {ino} differs after the copier finished"
            );
        }
        if let Some(t) = &exp.tree {
            assert!(
                frozen_tree(&fs) == *t,
                "{ctx}: the lazily split directory's view differs after the copier finished"
            );
        }
        for (id, t) in &exp.pairs {
            assert!(
                frozen_tree_of(&fs, Some(*id)) == *t,
                "{ctx}: the frozen files of pair {id} differ after the copier finished"
            );
        }
        for (name, t) in &exp.gens {
            assert!(
                gen_tree(&fs, name) == *t,
                "{ctx}: generation {name} differs after the copier finished"
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
            tree: None,
            pairs: Vec::new(),
            clone: None,
            gens: Vec::new(),
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

/// Lazy instants under power loss: a directory `d` of files is split and updated
/// lazily; its files are then written, truncated, chmod'ed, renamed inside it, moved out
/// to `o` and back, unlinked and recreated, each one's first change freezing it. After a
/// crash at every step (between the split and a first change, in the middle of a first
/// change: its record and the change not yet committed, or committed together) the frozen
/// view of `d` is exactly the split-time tree, before and after the copier finishes.
/// With `gens`, named generations of `d`'s pair are split, refreshed and released too,
/// and each one whose split returned must read its instant after every crash.
fn lazy_workload(seed: u64, ops: usize, gens: bool) -> (usize, usize) {
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
    let mk = |parent: u64, n: &[u8], mode: u32| {
        fs.create_node(ctx, parent, n, mode, 0, None)
            .unwrap()
            .row
            .ino
    };
    let d = mk(ROOT, b"d", libc::S_IFDIR | 0o755);
    let o = mk(ROOT, b"o", libc::S_IFDIR | 0o755);
    // Model: slot -> (inside d?, name, content, mode).
    let mut files: Vec<(bool, Vec<u8>, Vec<u8>, u32)> = Vec::new();
    for i in 0..FILES {
        let n = name(i);
        let ino = mk(d, &n, libc::S_IFREG | 0o644);
        let data = vec![i as u8 + 1; 1 + (i * 3000)];
        fs.write(ino, 0, &data).unwrap();
        files.push((true, n, data, 0o644));
    }
    let tree_of = |files: &[(bool, Vec<u8>, Vec<u8>, u32)]| -> Tree {
        files
            .iter()
            .filter(|f| f.0)
            .map(|f| {
                (
                    format!("d/{}", String::from_utf8_lossy(&f.1)),
                    (f.2.clone(), f.3),
                )
            })
            .collect()
    };
    let mut tree: Option<Tree> = None;
    let mut cursors = BTreeMap::new();
    let mut points = 0;
    let mut token = 1u8;
    let mut with_tree = 0;
    let mut named: BTreeMap<String, Tree> = BTreeMap::new();
    for _ in 0..ops {
        let i = rng.below(FILES as u64) as usize;
        let (inside, n) = (files[i].0, files[i].1.clone());
        let parent = if inside { d } else { o };
        let ino = fs.lookup(parent, &n).unwrap().row.ino;
        match rng.below(if gens { 17 } else { 14 }) {
            14 | 15 if tree.is_some() => {
                // Split or refresh generation g0..g2 (needs the pair: split first).
                let g = format!("g{}", rng.below(3));
                fs.control_gen(d, &g, Op::Split).unwrap();
                named.insert(g, tree_of(&files));
            }
            16 => {
                let g = format!("g{}", rng.below(3));
                if fs.control_gen(d, &g, Op::Release).is_ok() {
                    named.remove(&g);
                }
            }
            0..=2 => {
                let off = rng.below(6 * TS);
                let len = 1 + rng.below(2 * TS) as usize;
                token = token.wrapping_add(1).max(1);
                let data = vec![token; len];
                fs.write(ino, off, &data).unwrap();
                let f = &mut files[i].2;
                let end = off as usize + len;
                if f.len() < end {
                    f.resize(end, 0);
                }
                f[off as usize..end].copy_from_slice(&data);
            }
            3 => {
                let l = rng.below(files[i].2.len() as u64 + 1);
                fs.truncate(ino, l).unwrap();
                files[i].2.truncate(l as usize);
            }
            4 => {
                let m = 0o600 | (rng.below(8) as u32);
                fs.setattr(
                    ctx,
                    ino,
                    pairfs::core::fs::SetAttr {
                        mode: Some(m),
                        ..Default::default()
                    },
                )
                .unwrap();
                files[i].3 = m;
            }
            5 => {
                // Rename inside, or move out of / back into `d`.
                let (to_inside, np) = if rng.below(2) == 0 {
                    (inside, if inside { d } else { o })
                } else {
                    (!inside, if inside { o } else { d })
                };
                let mut nn = n.clone();
                nn.push(b'x');
                if nn.len() > 12 {
                    nn = name(i);
                }
                fs.rename(parent, &n, np, &nn, 0).unwrap();
                files[i].0 = to_inside;
                files[i].1 = nn;
            }
            6 => {
                fs.setxattr(ino, b"user.v", &[token], 0).unwrap();
            }
            7 => {
                fs.unlink(parent, &n, false).unwrap();
                let ni = mk(parent, &n, libc::S_IFREG | 0o644);
                fs.write(ni, 0, b"new").unwrap();
                files[i].2 = b"new".to_vec();
                files[i].3 = 0o644;
            }
            8 => fs.commit(Vec::new()).unwrap(),
            9 => {
                if fs.control(d, Op::Split).is_ok() {
                    tree = Some(tree_of(&files));
                }
            }
            10 => {
                if fs.control(d, Op::Update).is_ok() {
                    tree = Some(tree_of(&files));
                }
            }
            11 => fs.engine.destage(&fs).unwrap(),
            _ => {
                fs.engine.copy_round(&fs, &mut cursors);
            }
        }
        if let Some(t) = &tree {
            assert!(
                frozen_tree(&fs) == *t,
                "seed {seed:#x}: the lazily split directory's view differs while live"
            );
        }
        for (g, t) in &named {
            let got = gen_tree(&fs, g);
            if got != *t {
                for (k, v) in t {
                    match got.get(k) {
                        None => println!("missing {k}"),
                        Some(x) if x != v => println!(
                            "{k}: got len {} mode {:o}, want len {} mode {:o}; first diff {:?}",
                            x.0.len(),
                            x.1,
                            v.0.len(),
                            v.1,
                            x.0.iter().zip(&v.0).position(|(a, b)| a != b)
                        ),
                        _ => {}
                    }
                }
                for k in got.keys() {
                    if !t.contains_key(k) {
                        println!("extra {k}");
                    }
                }
            }
            assert!(
                got == *t,
                "seed {seed:#x}: generation {g} differs while live"
            );
        }
        let exp = Expect {
            frozen: BTreeMap::new(),
            durable: Vec::new(),
            tree: tree.clone(),
            pairs: Vec::new(),
            clone: None,
            gens: named.iter().map(|(g, t)| (g.clone(), t.clone())).collect(),
        };
        with_tree += usize::from(tree.is_some());
        check_crash(seed, points, &cdir, &paths, &vol, &copy, &exp, &mut rng);
        points += 1;
    }
    (points, with_tree)
}

/// Third embodiment under power loss: the files of a lazily split directory `d` are
/// written and truncated while single files are split (or paired) on their own (their
/// pinned tracks move), updated or resynced alone, joined back or released, and `d` is
/// updated. At every
/// step, after a crash, `d`'s frozen files are exactly its instant's (a file split off
/// after the instant keeps its instant content there; one split off before it is left
/// out) and each file pair's frozen file is exactly its own instant's, before and after
/// the copiers finish; fsck is clean.
fn group_workload(seed: u64, ops: usize) -> (usize, usize) {
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
    let d = fs
        .create_node(ctx, ROOT, b"d", libc::S_IFDIR | 0o755, 0, None)
        .unwrap()
        .row
        .ino;
    let mut inos = Vec::new();
    let mut data: Vec<Vec<u8>> = Vec::new();
    for i in 0..FILES {
        let ino = fs
            .create_node(ctx, d, &name(i), libc::S_IFREG | 0o644, 0, None)
            .unwrap()
            .row
            .ino;
        let v = vec![i as u8 + 1; 1 + i * 3000 + 2 * TS as usize];
        fs.write(ino, 0, &v).unwrap();
        inos.push(ino);
        data.push(v);
    }
    let path = |i: usize| format!("d/{}", String::from_utf8_lossy(&name(i)));
    let pair_of = |ino: u64| fs.engine.status_of(&fs, ino).unwrap().map(|s| s.id);
    fs.control(d, Op::Split).unwrap();
    let gid = pair_of(d).unwrap();
    // The group's instant, and each file pair: slot -> (pair, content at its instant).
    let mut group: Tree = (0..FILES)
        .map(|i| (path(i), (data[i].clone(), 0o644)))
        .collect();
    // (None: paired on its own, not split yet.)
    let mut own: BTreeMap<usize, (u64, Option<Vec<u8>>)> = BTreeMap::new();
    let mut cursors = BTreeMap::new();
    let (mut points, mut offs) = (0, 0);
    let mut token = 1u8;
    for _ in 0..ops {
        let i = rng.below(FILES as u64) as usize;
        let ino = inos[i];
        match rng.below(13) {
            0..=2 => {
                let off = rng.below(5 * TS);
                let len = 1 + rng.below(2 * TS) as usize;
                token = token.wrapping_add(1).max(1);
                let w = vec![token; len];
                fs.write(ino, off, &w).unwrap();
                let f = &mut data[i];
                let end = off as usize + len;
                if f.len() < end {
                    f.resize(end, 0);
                }
                f[off as usize..end].copy_from_slice(&w);
            }
            3 => {
                let l = rng.below(data[i].len() as u64 + 1);
                fs.truncate(ino, l).unwrap();
                data[i].truncate(l as usize);
            }
            4 | 5 => {
                // Split (or pair) on its own: a pair of its own; a split of an own pair
                // that is not forming or formed is refused.
                let op = if rng.below(4) == 0 {
                    Op::Pair
                } else {
                    Op::Split
                };
                let was = own.contains_key(&i);
                if fs.control(ino, op).is_ok() {
                    let id = pair_of(ino).unwrap();
                    assert_ne!(id, gid, "seed {seed:#x}: the split made no pair of its own");
                    let content = (op == Op::Split).then(|| data[i].clone());
                    own.insert(i, (id, content));
                    offs += usize::from(!was);
                }
            }
            6 => {
                if !own.contains_key(&i) {
                } else if rng.below(4) == 0 {
                    // Resync of the file's own pair: its frozen copy goes.
                    if fs.control(ino, Op::Resync).is_ok() {
                        own.get_mut(&i).unwrap().1 = None;
                    }
                } else if fs.control(ino, Op::Update).is_ok() {
                    own.get_mut(&i).unwrap().1 = Some(data[i].clone());
                }
            }
            7 | 8 => {
                if own.contains_key(&i) {
                    let op = if rng.below(2) == 0 {
                        Op::Join
                    } else {
                        Op::Release
                    };
                    fs.control(ino, op).unwrap();
                    own.remove(&i);
                    assert_eq!(pair_of(ino), Some(gid), "seed {seed:#x}: back in the group");
                }
            }
            9 => {
                if fs.control(d, Op::Update).is_ok() {
                    // Files with pairs of their own are not in the group's instant.
                    group = (0..FILES)
                        .filter(|k| !own.contains_key(k))
                        .map(|k| (path(k), (data[k].clone(), 0o644)))
                        .collect();
                }
            }
            10 => fs.commit(Vec::new()).unwrap(),
            11 => fs.engine.destage(&fs).unwrap(),
            _ => {
                fs.engine.copy_round(&fs, &mut cursors);
            }
        }
        let mut pairs = vec![(gid, group.clone())];
        for (&k, (id, c)) in &own {
            let t: Tree = c.iter().map(|c| (path(k), (c.clone(), 0o644))).collect();
            pairs.push((*id, t));
        }
        for (id, t) in &pairs {
            assert!(
                frozen_tree_of(&fs, Some(*id)) == *t,
                "seed {seed:#x}: the frozen files of pair {id} differ while live"
            );
        }
        let exp = Expect {
            frozen: BTreeMap::new(),
            durable: Vec::new(),
            tree: None,
            pairs,
            clone: None,
            gens: Vec::new(),
        };
        check_crash(seed, points, &cdir, &paths, &vol, &copy, &exp, &mut rng);
        points += 1;
    }
    (points, offs)
}

/// The seeds of a power-loss test's workloads: `workloads` of them (default
/// `PAIRFS_CRASH_WORKLOADS`) spread from `base` (default `PAIRFS_CRASH_SEED`, hex).
fn workload_seeds(base: u64, workloads: u64) -> Vec<u64> {
    let base = std::env::var("PAIRFS_CRASH_SEED")
        .ok()
        .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok())
        .unwrap_or(base);
    let workloads: u64 = std::env::var("PAIRFS_CRASH_WORKLOADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(workloads);
    (0..workloads)
        .map(|w| base.wrapping_add(w.wrapping_mul(0x9E3779B97F4A7C15)) | 1)
        .collect()
}

#[test]
fn power_loss_keeps_a_group_and_a_file_split_off_it() {
    let seeds = workload_seeds(0x6e0_0001, 20);
    let workloads = seeds.len();
    let (mut points, mut offs) = (0, 0);
    for (w, seed) in seeds.into_iter().enumerate() {
        println!("group crash workload {w}: seed {seed:#x}");
        let (p, o) = group_workload(seed, 40);
        points += p;
        offs += o;
    }
    println!(
        "group power-loss test: {workloads} workloads, {points} crash points, {offs} files \
         split off, 0 losses"
    );
    assert!(offs >= workloads, "too few splits off: {offs}");
}

/// Writable clones under power loss: a file is split and cloned; the clone is written
/// (partial tracks, so each first write fills a track from the frozen copy), truncated,
/// punched, fsync'd, committed and detached while the source is rewritten (copy-on-write)
/// and the copier runs. After a crash at every step the frozen copy is exact and the clone
/// reads its committed content with at most some of the writes since laid over it.
fn clone_workload(seed: u64, ops: usize) -> usize {
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
    let src = fs
        .create_node(ctx, ROOT, b"s", libc::S_IFREG | 0o644, 0, None)
        .unwrap()
        .row
        .ino;
    let base: Vec<u8> = (0..12 * TS).map(|i| (i / 512 % 251) as u8 + 1).collect();
    fs.write(src, 0, &base).unwrap();
    fs.control(src, Op::Split).unwrap();
    let made = fs.make_clone(src, ROOT, b"c").unwrap();
    let c = made.ino;
    let frozen = BTreeMap::from([(src, base.clone())]);
    let (mut cur, mut durable) = (base.clone(), base.clone());
    let mut since: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut cursors = BTreeMap::new();
    let mut points = 0;
    let mut token = 1u8;
    for _ in 0..ops {
        match rng.below(12) {
            0..=4 => {
                let off = rng.below(14 * TS);
                let len = 1 + rng.below(2 * TS) as usize;
                token = token.wrapping_add(1).max(1);
                let data = vec![token; len];
                fs.write(c, off, &data).unwrap();
                let end = off as usize + len;
                if cur.len() < end {
                    cur.resize(end, 0);
                }
                cur[off as usize..end].copy_from_slice(&data);
                since.push((off, data));
            }
            5 => {
                let n = rng.below(cur.len() as u64 + 1);
                fs.truncate(c, n).unwrap();
                if (n as usize) < cur.len() {
                    // Bytes past the cut in a kept track are zeroed in place.
                    since.push((n, vec![0; cur.len() - n as usize]));
                }
                cur.truncate(n as usize);
            }
            6 => {
                if cur.is_empty() {
                    continue;
                }
                let off = rng.below(cur.len() as u64);
                let len = 1 + rng.below(3 * TS);
                fs.fallocate(
                    c,
                    off,
                    len,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                )
                .unwrap();
                let end = ((off + len) as usize).min(cur.len());
                cur[off as usize..end].fill(0);
                since.push((off, vec![0; end - off as usize]));
            }
            7 => {
                fs.commit(Vec::new()).unwrap();
                durable = cur.clone();
                since.clear();
            }
            8 => {
                fs.fsync(c, rng.below(2) == 0).unwrap();
                durable = cur.clone();
                since.clear();
            }
            9 => {
                // Rewrite the source: copy-on-write of its frozen tracks.
                let off = rng.below(12 * TS);
                fs.write(src, off, &[0xee; 700]).unwrap();
            }
            10 if rng.below(6) == 0 => {
                // Detach (commits: the clone's map and its cleared backing together).
                fs.detach(c).unwrap();
                durable = cur.clone();
                since.clear();
            }
            _ => {
                fs.engine.copy_round(&fs, &mut cursors);
            }
        }
        assert_eq!(
            read_file(&fs, c),
            cur,
            "seed {seed:#x}: live read of the clone differs from what was written"
        );
        let exp = Expect {
            frozen: frozen.clone(),
            durable: Vec::new(),
            tree: None,
            pairs: Vec::new(),
            clone: Some(CloneExpect {
                name: b"c".to_vec(),
                durable: durable.clone(),
                since: since.clone(),
            }),
            gens: Vec::new(),
        };
        check_crash(seed, points, &cdir, &paths, &vol, &copy, &exp, &mut rng);
        points += 1;
    }
    points
}

/// Regression (seed 0x1649d8f76805383b of `power_loss_keeps_writable_clones`, reduced): a
/// punch (or ZERO_RANGE) of a clone that runs past EOF ends at the size. When the size is
/// inside a track that is still a backed hole (a truncate to a size that is not a track
/// multiple lowers the limit there), that tail track must be filled before its part of
/// the range is zeroed; it used to be left unfilled (the fill asked for the track of the
/// unclipped end) and read the frozen bytes where zeros had been punched. Each case runs
/// on a fresh clone of the same frozen file, is checked live, then committed and checked
/// after a simulated power loss.
#[test]
fn clone_punch_past_eof_zeroes_a_backed_tail_track() {
    let dir = tempfile::tempdir_in(
        std::env::var("PAIRFS_TEST_DIR").unwrap_or_else(|_| "/dev/shm".into()),
    )
    .unwrap();
    let cdir = dir.path().join("crash");
    std::fs::create_dir(&cdir).unwrap();
    let (paths, _g, vol, copy) = new_volume(dir.path());
    let fs = open_fs(&paths, Box::new(vol.clone()), Box::new(copy.clone()));
    let mut rng = Rng(0x1649d8f76805383b);
    let src = fs
        .create_node(Ctx::default(), ROOT, b"s", libc::S_IFREG | 0o644, 0, None)
        .unwrap()
        .row
        .ino;
    let base: Vec<u8> = (0..12 * TS).map(|i| (i / 512 % 251) as u8 + 1).collect();
    fs.write(src, 0, &base).unwrap();
    fs.control(src, Op::Split).unwrap();
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // (truncate to, fallocate offset, length, mode): the seed's pair of operations, an
    // aligned start, a start in the tail track itself, and ZERO_RANGE (which extends).
    let cases: [(u64, u64, u64, i32); 4] = [
        (9557, 7499, 9779, punch),
        (2 * TS + 100, TS, 3 * TS, punch),
        (2 * TS + 100, 2 * TS + 10, TS, punch),
        (2 * TS + 100, TS + 7, 3 * TS, libc::FALLOC_FL_ZERO_RANGE),
    ];
    for (k, &(size, off, len, mode)) in cases.iter().enumerate() {
        let name = format!("c{k}").into_bytes();
        let c = fs.make_clone(src, ROOT, &name).unwrap().ino;
        fs.truncate(c, size).unwrap();
        fs.fallocate(c, off, len, mode).unwrap();
        let mut want = base[..size as usize].to_vec();
        if mode & libc::FALLOC_FL_KEEP_SIZE == 0 {
            want.resize(want.len().max((off + len) as usize), 0);
        }
        let end = ((off + len) as usize).min(want.len());
        want[off as usize..end].fill(0);
        let got = read_file(&fs, c);
        assert_eq!(got.len(), want.len(), "case {k}: size");
        if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
            panic!(
                "case {k}: clone byte {i} (track {}) is {}, want {}",
                i as u64 / TS,
                got[i],
                want[i]
            );
        }
        fs.commit(Vec::new()).unwrap();
        let exp = Expect {
            frozen: BTreeMap::from([(src, base.clone())]),
            durable: Vec::new(),
            tree: None,
            pairs: Vec::new(),
            clone: Some(CloneExpect {
                name,
                durable: want,
                since: Vec::new(),
            }),
            gens: Vec::new(),
        };
        check_crash(
            0x1649d8f76805383b,
            k,
            &cdir,
            &paths,
            &vol,
            &copy,
            &exp,
            &mut rng,
        );
    }
}

#[test]
fn power_loss_keeps_writable_clones() {
    let seeds = workload_seeds(0xc10_0001, 20);
    let workloads = seeds.len();
    let mut points = 0;
    for (w, seed) in seeds.into_iter().enumerate() {
        println!("clone crash workload {w}: seed {seed:#x}");
        points += clone_workload(seed, 40);
    }
    println!("clone power-loss test: {workloads} workloads, {points} crash points, 0 losses");
}

/// Runs [`lazy_workload`] over the seeds from `base`: (workloads, crash points, points
/// after a split).
fn lazy_runs(what: &str, base: u64, ops: usize, gens: bool) -> (usize, usize, usize) {
    let seeds = workload_seeds(base, 20);
    let workloads = seeds.len();
    let (mut points, mut with_tree) = (0, 0);
    for (w, seed) in seeds.into_iter().enumerate() {
        println!("{what} crash workload {w}: seed {seed:#x}");
        let (p, t) = lazy_workload(seed, ops, gens);
        points += p;
        with_tree += t;
    }
    (workloads, points, with_tree)
}

#[test]
fn power_loss_keeps_lazy_directory_instants() {
    let (workloads, points, with_tree) = lazy_runs("lazy", 0x1a2_0001, 40, false);
    println!(
        "lazy power-loss test: {workloads} workloads, {points} crash points ({with_tree} with a \
         lazy instant to check), 0 losses"
    );
    assert!(
        with_tree * 2 > points,
        "too few crash points after a lazy split: {with_tree} of {points}"
    );
}

#[test]
fn power_loss_at_every_step_keeps_frozen_copies_and_fsynced_data() {
    let seeds = workload_seeds(0x5eed_0001, 30);
    let workloads = seeds.len();
    let mut points = 0;
    let mut staged = 0;
    for (w, seed) in seeds.into_iter().enumerate() {
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

#[test]
fn power_loss_keeps_named_generations() {
    let (workloads, points, with_tree) = lazy_runs("generations", 0x9e4_0001, 50, true);
    println!(
        "generations power-loss test: {workloads} workloads, {points} crash points \
         ({with_tree} after a split), 0 losses"
    );
}
