//! Named generations through real mounts (issue 13 part 1): several instants per pair at
//! file, directory and volume scope, each read back under `@NAME/` of the copy mount
//! exactly as it was, space shared and given back, kept across a remount and a kill -9.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

fn setv(p: &Path, name: &str, value: &str) -> std::io::Result<()> {
    let out = Command::new("setfattr")
        .args(["-n", name, "-v", value])
        .arg(p)
        .output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }
}

fn gen_split(p: &Path, name: &str) {
    setv(p, "user.pairfs.split", name).unwrap_or_else(|e| panic!("split {name}: {e}"));
}

fn gen_release(p: &Path, name: &str) {
    setv(p, "user.pairfs.release", name).unwrap_or_else(|e| panic!("release {name}: {e}"));
}

/// `user.pairfs.generations` of the mount root, one line per generation.
fn gen_lines(v: &Vol) -> Vec<String> {
    let out = Command::new("getfattr")
        .args(["-n", "user.pairfs.generations", "--only-values"])
        .arg(&v.mnt)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

fn used_bytes(v: &Vol) -> u64 {
    let out = Command::new("getfattr")
        .args(["-n", "user.pairfs.volume", "--only-values"])
        .arg(&v.mnt)
        .output()
        .unwrap();
    field(&String::from_utf8_lossy(&out.stdout), "used_bytes").unwrap()
}

/// Every regular file and symlink beneath `dir` with its content (a symlink: its
/// target), and every directory (empty content), by relative path.
fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(base: &Path, d: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let rel = p.strip_prefix(base).unwrap().display().to_string();
            if rel.starts_with('@') {
                continue;
            }
            let t = e.file_type().unwrap();
            if t.is_dir() {
                out.insert(rel + "/", Vec::new());
                walk(base, &p, out);
            } else if t.is_symlink() {
                out.insert(
                    rel,
                    std::fs::read_link(&p)
                        .unwrap()
                        .into_os_string()
                        .into_encoded_bytes(),
                );
            } else {
                out.insert(rel, read_all(&p));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn same_tree(what: &str, got: &BTreeMap<String, Vec<u8>>, want: &BTreeMap<String, Vec<u8>>) {
    let gk: Vec<&String> = got.keys().collect();
    let wk: Vec<&String> = want.keys().collect();
    assert_eq!(gk, wk, "{what}: names");
    for (k, w) in want {
        same(&format!("{what}: {k}"), &got[k], w);
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Ten generations of one 4 MiB file, eight kept at a time: each reads back its
/// instant, before and after a remount; a track overwritten once after several splits
/// is stored once; releases give back only what no other generation shares.
#[test]
fn file_generations_read_their_instants_and_share_space() {
    let mut v = Vol::new("1G");
    v.mount();
    let f = v.path("db");
    make(&f, 64, 0);
    ctl(&f, "pair");
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut alive: Vec<(String, Vec<u8>)> = Vec::new();
    let mut ver = 1;
    for k in 0..10 {
        if alive.len() == 8 {
            let (name, _) = alive.remove(0);
            gen_release(&f, &name);
        }
        let name = format!("g{k}");
        gen_split(&f, &name);
        alive.push((name, read_all(&f)));
        for _ in 0..12 {
            put(&f, rng.next(64), ver, 64 * 1024);
            ver += 1;
        }
        for (name, want) in &alive {
            same(name, &read_all(&v.copy_path(&format!("@{name}/db"))), want);
        }
    }
    let lines = gen_lines(&v);
    assert_eq!(lines.len(), 8, "{lines:?}");
    let saved: u64 = lines.iter().map(|l| field(l, "saved_bytes").unwrap()).sum();
    let own: u64 = lines.iter().map(|l| field(l, "own_bytes").unwrap()).sum();
    assert!(own < saved, "no slot shared: own {own} saved {saved}");
    v.umount();
    v.fsck();
    v.mount();
    for (name, want) in &alive {
        same(
            &format!("{name} after remount"),
            &read_all(&v.copy_path(&format!("@{name}/db"))),
            want,
        );
    }
    // Releasing all but the newest gives back space; the newest still reads right.
    let before = used_bytes(&v);
    let (last, want) = alive.pop().unwrap();
    for (name, _) in &alive {
        gen_release(&f, name);
    }
    same(
        "newest after releases",
        &read_all(&v.copy_path(&format!("@{last}/db"))),
        &want,
    );
    // Freed slots come back after the next commit.
    std::fs::File::open(&f).unwrap().sync_all().unwrap();
    let after = used_bytes(&v);
    assert!(after < before, "used {before} -> {after}");
    gen_release(&f, &last);
    assert!(gen_lines(&v).is_empty());
    assert!(!v.copy_path(&format!("@{last}")).exists());
    v.umount();
    v.fsck();
}

/// Builds a small tree under `d` (files, a subdirectory, a symlink, a hard link).
fn populate(d: &Path, ver: u64) {
    std::fs::create_dir_all(d.join("sub/deep")).unwrap();
    for i in 0..6 {
        make(&d.join(format!("f{i}")), 3, ver + i);
    }
    make(&d.join("sub/deep/x"), 2, ver + 10);
    std::os::unix::fs::symlink("f1", d.join("link")).unwrap();
    std::fs::hard_link(d.join("f2"), d.join("sub/f2-hard")).unwrap();
}

/// Changes of every kind after a split: overwrite, append, truncate, unlink, rename
/// within and out of the scope, new files and directories, chmod, a symlink replaced.
fn churn(d: &Path, outside: &Path, k: u64) {
    put(&d.join("f0"), 1, 100 + k, 64 * 1024);
    let f = std::fs::OpenOptions::new()
        .append(true)
        .open(d.join("f1"))
        .unwrap();
    f.write_all_at(&block(7, k, 5000), 3 * 64 * 1024).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("f3"))
        .unwrap()
        .set_len(1000 + k)
        .unwrap();
    let _ = std::fs::remove_file(d.join("f4"));
    if d.join("f5").exists() {
        std::fs::rename(d.join("f5"), d.join("sub/f5-moved")).unwrap();
    } else if d.join("sub/f5-moved").exists() {
        std::fs::rename(d.join("sub/f5-moved"), outside.join(format!("gone{k}"))).unwrap();
    }
    make(&d.join(format!("new{k}")), 1, 200 + k);
    std::fs::create_dir_all(d.join(format!("dir{k}"))).unwrap();
    std::fs::set_permissions(
        d.join("f2"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600 + (k as u32 % 8)),
    )
    .unwrap();
    let _ = std::fs::remove_file(d.join("link"));
    std::os::unix::fs::symlink(format!("target{k}"), d.join("link")).unwrap();
    put(&d.join("sub/deep/x"), 0, 300 + k, 64 * 1024);
}

/// Generations of a directory pair and of the volume pair (lazy instants), each
/// compared with a copy of the tree taken at its split, through changes of every kind;
/// again after a remount.
#[test]
fn directory_and_volume_generations_keep_their_trees() {
    let mut v = Vol::new("1G");
    v.mount();
    let d = v.path("data");
    let out = v.path("elsewhere");
    std::fs::create_dir(&out).unwrap();
    populate(&d, 1);
    ctl(&d, "split");
    let mut want: Vec<(String, BTreeMap<String, Vec<u8>>)> = Vec::new();
    for k in 0..4 {
        let name = format!("h{k}");
        gen_split(&d, &name);
        want.push((name, tree(&d)));
        churn(&d, &out, k);
        for (name, w) in &want {
            same_tree(name, &tree(&v.copy_path(&format!("@{name}/data"))), w);
        }
    }
    // The pair's own frozen copy is still the first instant's.
    // Refresh one generation: it now shows the tree of now.
    gen_split(&d, "h1");
    let now = tree(&d);
    want[1].1 = now;
    churn(&d, &out, 9);
    v.umount();
    v.fsck();
    v.mount();
    for (name, w) in &want {
        same_tree(
            &format!("{name} after remount"),
            &tree(&v.copy_path(&format!("@{name}/data"))),
            w,
        );
    }
    // A generation of the whole volume.
    ctl(&d, "release");
    assert!(
        gen_lines(&v).is_empty(),
        "a pair's release takes its generations"
    );
    ctl(&v.mnt, "split");
    gen_split(&v.mnt, "vol");
    let w = tree(&v.mnt);
    churn(&d, &out, 20);
    same_tree("@vol", &tree(&v.copy_path("@vol")), &w);
    v.umount();
    v.fsck();
}

/// Refused: a generation named like a number, of a path inside a pair's scope, of an
/// unpaired file; releasing one that does not exist.
#[test]
fn generation_errors() {
    let mut v = Vol::new("1G");
    v.mount();
    let d = v.path("d");
    std::fs::create_dir(&d).unwrap();
    make(&d.join("a"), 1, 1);
    make(&v.path("lone"), 1, 1);
    assert!(setv(&v.path("lone"), "user.pairfs.split", "g").is_err());
    ctl(&d, "pair");
    assert!(setv(&d, "user.pairfs.split", "9g").is_err());
    assert!(setv(&d, "user.pairfs.split", "a/b").is_err());
    assert!(setv(&d.join("a"), "user.pairfs.split", "g").is_err());
    assert!(setv(&d, "user.pairfs.release", "nosuch").is_err());
    gen_split(&d, "ok");
    assert_eq!(gen_lines(&v).len(), 1);
    // The CLI and the metrics see it.
    let st = pairfs(&["status", v.mnt.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&st.stdout);
    assert!(
        text.contains("GENERATION") && text.contains("ok "),
        "{text}"
    );
    let prom = pairfs(&["status", "--prometheus"]);
    let text = String::from_utf8_lossy(&prom.stdout);
    let mp = v.mnt.to_str().unwrap();
    assert!(
        text.lines().any(
            |l| l.starts_with("pairfs_generation_split_timestamp_seconds{")
                && l.contains("generation=\"ok\"")
                && l.contains(mp)
        ),
        "{text}"
    );
    let out = pairfs(&["release", "--generation", "ok", d.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(gen_lines(&v).is_empty());
    let out = pairfs(&["split", "--generation", "again", d.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(gen_lines(&v).len(), 1);
    v.umount();
}

/// kill -9 of the daemon while a writer overwrites a file and generations are split
/// between its writes: after a remount every generation reads exactly the file as it
/// was at its split (each save reached the copy image and the database before its
/// overwrite reached the volume), and fsck is clean.
#[test]
fn kill9_under_writes_keeps_every_generation() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let mut v = Vol::new("1G");
    v.mount();
    let f = v.path("db");
    make(&f, 128, 0);
    ctl(&f, "pair");
    let pause = Arc::new(Mutex::new(()));
    let dead = Arc::new(AtomicBool::new(false));
    let writer = {
        let (pause, dead, f) = (pause.clone(), dead.clone(), f.clone());
        std::thread::spawn(move || {
            let file = std::fs::OpenOptions::new().write(true).open(&f).unwrap();
            let mut rng = Rng(0xfeed_beef_1234_5677);
            let mut ver = 1;
            let mut n = 0u64;
            while !dead.load(Ordering::Acquire) {
                let _p = pause.lock().unwrap();
                let b = rng.next(128 * 16);
                // 4 KiB writes anywhere in the 8 MiB file, now and then an fsync.
                if file.write_all_at(&block(b, ver, 4096), b * 4096).is_err() {
                    break;
                }
                if ver % 16 == 0 && file.sync_data().is_err() {
                    break;
                }
                ver += 1;
                n += 1;
            }
            n
        })
    };
    let mut want = Vec::new();
    for k in 0..6 {
        std::thread::sleep(std::time::Duration::from_millis(150));
        let _p = pause.lock().unwrap();
        let name = format!("k{k}");
        gen_split(&f, &name);
        want.push((name, read_all(&f)));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    v.kill9();
    dead.store(true, Ordering::Release);
    let writes = writer.join().unwrap();
    assert!(writes > 100, "only {writes} writes");
    v.fsck();
    v.mount();
    for (name, w) in &want {
        same(
            &format!("{name} after kill -9"),
            &read_all(&v.copy_path(&format!("@{name}/db"))),
            w,
        );
    }
    assert_eq!(gen_lines(&v).len(), 6);
    v.umount();
    v.fsck();
}

/// A byte flipped in a generation's saved track on the copy image: reading it through
/// `@NAME/` is EIO (never wrong bytes) and `pairfs scrub` exits 1, online and offline;
/// the pair's own frozen copy and the other tracks still read.
#[test]
fn a_flipped_byte_in_a_saved_track_is_eio_and_scrub_finds_it() {
    let mut v = Vol::new("1G");
    v.mount();
    let f = v.path("db");
    make(&f, 16, 0);
    ctl(&f, "split");
    wait_state(&f, "split");
    gen_split(&f, "s");
    let want = read_all(&f);
    put(&f, 3, 9, 64 * 1024);
    same("@s before", &read_all(&v.copy_path("@s/db")), &want);
    let clean = pairfs(&["scrub", v.mnt.to_str().unwrap()]);
    assert!(
        clean.status.success(),
        "{}",
        String::from_utf8_lossy(&clean.stdout)
    );
    v.umount();
    let slot: u64 = {
        let c = rusqlite::Connection::open(v.dir.path().join("vol.img.meta")).unwrap();
        c.query_row("SELECT slot FROM gen_saved", [], |r| r.get(0))
            .unwrap()
    };
    let copy = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(v.dir.path().join("vol.img.copy"))
        .unwrap();
    let at = slot * 65536 + 100;
    let mut b = [0u8];
    copy.read_exact_at(&mut b, at).unwrap();
    copy.write_all_at(&[b[0] ^ 0x40], at).unwrap();
    copy.sync_all().unwrap();
    let off = pairfs(&["scrub", v.img.to_str().unwrap()]);
    assert_eq!(
        off.status.code(),
        Some(1),
        "offline scrub: {}",
        String::from_utf8_lossy(&off.stdout)
    );
    v.mount();
    let g = std::fs::File::open(v.copy_path("@s/db")).unwrap();
    let mut buf = vec![0u8; 4096];
    let e = g.read_exact_at(&mut buf, 3 * 64 * 1024).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    g.read_exact_at(&mut buf, 0).unwrap();
    same("untouched track", &buf, &want[..4096]);
    drop(g);
    same("own frozen copy", &read_all(&v.copy_path("db")), &want);
    let on = pairfs(&["scrub", v.mnt.to_str().unwrap()]);
    assert_eq!(
        on.status.code(),
        Some(1),
        "online scrub: {}",
        String::from_utf8_lossy(&on.stdout)
    );
    assert!(
        String::from_utf8_lossy(&on.stdout).contains("@s/db"),
        "{}",
        String::from_utf8_lossy(&on.stdout)
    );
    v.umount();
}

/// `pairfs diff --generation NAME`: after 4 KiB writes (not fsync'd, so still staged when
/// asked) the ranges cover every changed byte and, rounded to tracks, nothing else; the
/// pair's own diff and another generation's differ as their instants do.
#[test]
fn diff_against_a_generation_lists_exactly_the_changed_tracks() {
    let mut v = Vol::new("1G");
    v.mount();
    let f = v.path("db");
    make(&f, 64, 0);
    ctl(&f, "pair");
    gen_split(&f, "early");
    let file = std::fs::OpenOptions::new().write(true).open(&f).unwrap();
    file.write_all_at(&block(1, 1, 4096), 5 * 65536 + 8192)
        .unwrap();
    gen_split(&f, "late");
    let mut rng = Rng(0x5151_7777_1234_5679);
    let mut late: std::collections::BTreeSet<u64> = std::collections::BTreeSet::new();
    for k in 0..40 {
        let off = rng.next(64 * 16) * 4096;
        file.write_all_at(&block(100 + k, 2, 4096), off).unwrap();
        late.insert(off / 65536);
    }
    let ranges = |g: &str| -> std::collections::BTreeSet<u64> {
        let out = pairfs(&["diff", f.to_str().unwrap(), "--generation", g]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut t = std::collections::BTreeSet::new();
        for l in String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with('#'))
        {
            let mut it = l.split_whitespace().map(|x| x.parse::<u64>().unwrap());
            let (o, n) = (it.next().unwrap(), it.next().unwrap());
            assert!(o % 65536 == 0 && (n % 65536 == 0), "whole tracks: {l}");
            t.extend(o / 65536..(o + n) / 65536);
        }
        t
    };
    assert_eq!(ranges("late"), late, "since late");
    let mut early = late.clone();
    early.insert(5);
    assert_eq!(ranges("early"), early, "since early");
    let out = pairfs(&["diff", f.to_str().unwrap(), "--generation", "nosuch"]);
    assert_eq!(out.status.code(), Some(2));
    drop(file);
    v.umount();
}
