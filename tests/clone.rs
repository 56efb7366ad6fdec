//! Writable clones (`pairfs clone`, seed 003) through a real mount: a file and a tree
//! read as the frozen copy, writes are redirected (the source and its frozen copy never
//! change), truncate/punch/extend, remount and kill -9, the source pair refusing
//! update/resync/release until `--detach`, a clone split and cloned in turn, and a second
//! PostgreSQL started on a clone of a running cluster's split data directory.

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1 << 20;
const TS: u64 = 64 * 1024;

fn write_at(p: &Path, off: u64, data: &[u8]) {
    let f = OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(data, off).unwrap();
}

fn run(args: &[&str]) -> (bool, String) {
    let o = pairfs(args);
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

fn ok(args: &[&str]) -> String {
    let (good, out) = run(args);
    assert!(good, "pairfs {args:?}: {out}");
    out
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn sh(cmd: &str) {
    let o = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(
        o.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    if let Some(at) = first_diff(got, want) {
        panic!(
            "{what}: differs at byte {at} (len {} vs {})",
            got.len(),
            want.len()
        );
    }
}

#[test]
fn a_file_clone_reads_the_frozen_copy_and_redirects_its_writes() {
    let mut v = Vol::new("2G");
    v.mount();
    let size = 8 * MIB + 12345;
    let orig = block(1, 0, size as usize);
    let f = v.path("f");
    std::fs::write(&f, &orig).unwrap();
    ok(&["split", s(&f)]);
    // The live file moves on after the split; the clone is of the frozen copy.
    let mut live = orig.clone();
    let w = block(2, 0, 300_000);
    write_at(&f, MIB, &w);
    live[MIB as usize..MIB as usize + w.len()].copy_from_slice(&w);
    let c = v.path("c");
    let t = Instant::now();
    ok(&["clone", s(&f), s(&c)]);
    eprintln!("clone of an 8 MiB file: {:?}", t.elapsed());
    assert_same("clone = frozen copy", &read_all(&c), &orig);
    assert_eq!(std::fs::metadata(&c).unwrap().blocks(), 0, "nothing copied");

    // Writes: inside one track, across a track boundary, a large unaligned run, and
    // one that extends the file.
    let mut model = orig.clone();
    for (k, (off, len)) in [
        (0u64, 100usize),
        (TS - 10, 20),
        (5 * MIB + 7, 200_000),
        (size - 5, 50),
    ]
    .into_iter()
    .enumerate()
    {
        let d = block(10 + k as u64, 1, len);
        write_at(&c, off, &d);
        let end = off as usize + len;
        if model.len() < end {
            model.resize(end, 0);
        }
        model[off as usize..end].copy_from_slice(&d);
    }
    assert_same("clone after writes", &read_all(&c), &model);
    assert_same("source untouched", &read_all(&f), &live);
    assert_same("frozen copy untouched", &read_all(&v.copy_path("f")), &orig);
    // Space: only the tracks written (0, 1, 80..84, 128, 129).
    let used = std::fs::metadata(&c).unwrap().blocks() * 512;
    assert!(used <= 12 * TS, "clone uses {used} bytes");

    // Truncate down then up: the bytes past the shrink read zero, not the frozen ones.
    let cut = 3 * MIB + 5;
    OpenOptions::new()
        .write(true)
        .open(&c)
        .unwrap()
        .set_len(cut)
        .unwrap();
    OpenOptions::new()
        .write(true)
        .open(&c)
        .unwrap()
        .set_len(6 * MIB)
        .unwrap();
    model.truncate(cut as usize);
    model.resize(6 * MIB as usize, 0);
    assert_same("clone after truncate/extend", &read_all(&c), &model);
    // Punch a hole over unwritten tracks: zeros, not the frozen bytes.
    sh(&format!(
        "fallocate --punch-hole --offset {} --length {} {}",
        MIB + 100,
        MIB + 100,
        s(&c)
    ));
    for b in &mut model[(MIB + 100) as usize..(2 * MIB + 200) as usize] {
        *b = 0;
    }
    assert_same("clone after punch", &read_all(&c), &model);
    // Preallocation keeps the content.
    sh(&format!(
        "fallocate --keep-size --offset {} --length {} {}",
        2 * MIB + 300,
        100_000,
        s(&c)
    ));
    assert_same("clone after fallocate", &read_all(&c), &model);
    let status = ok(&["status", s(&v.mnt)]);
    assert!(status.contains("/c"), "status lists the clone: {status}");

    v.umount();
    v.fsck();
    v.mount();
    assert_same("clone after remount", &read_all(&c), &model);
    assert_same(
        "frozen copy after remount",
        &read_all(&v.copy_path("f")),
        &orig,
    );
    assert_same("source after remount", &read_all(&f), &live);
}

/// (relative path with mode and owner, kind, content or target, xattr user.k, inode).
type Object = (String, String, Vec<u8>, Option<Vec<u8>>, u64);

/// Every object below `root`, sorted.
fn tree(root: &Path) -> Vec<Object> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_str().unwrap().to_string();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let ft = m.file_type();
            let (kind, content) = if ft.is_dir() {
                stack.push(p.clone());
                ("dir", Vec::new())
            } else if ft.is_symlink() {
                (
                    "symlink",
                    std::fs::read_link(&p)
                        .unwrap()
                        .into_os_string()
                        .into_encoded_bytes(),
                )
            } else if ft.is_file() {
                ("file", read_all(&p))
            } else {
                ("special", Vec::new())
            };
            let x = if ft.is_symlink() {
                None
            } else {
                let o = Command::new("getfattr")
                    .args(["--only-values", "-n", "user.k"])
                    .arg(&p)
                    .output()
                    .unwrap();
                o.status.success().then_some(o.stdout)
            };
            out.push((
                format!("{rel} {:o} {}", m.mode(), m.uid()),
                kind.to_string(),
                content,
                x,
                m.ino(),
            ));
        }
    }
    out.sort();
    out
}

#[test]
fn a_directory_clone_keeps_the_tree_and_the_source_waits_for_detach() {
    let mut v = Vol::new("2G");
    v.mount();
    let d = v.path("d");
    std::fs::create_dir_all(d.join("sub/deeper")).unwrap();
    for i in 0..40u64 {
        let len = (i * 37_000) as usize;
        std::fs::write(d.join(format!("sub/f{i}")), block(i, 0, len)).unwrap();
    }
    std::fs::write(d.join("big"), block(99, 0, (3 * MIB) as usize)).unwrap();
    std::fs::write(d.join("sub/deeper/g"), b"g").unwrap();
    sh(&format!(
        "cd {} && ln -s sub/f3 link && ln big hard && mkfifo fifo && chmod 640 sub/f2 && \
         setfattr -n user.k -v hello sub/f1 && setfattr -n user.k -v dir sub",
        s(&d)
    ));
    // A live (unpaired) directory: the clone splits it first.
    let dc = v.path("dc");
    ok(&["clone", s(&d), s(&dc)]);
    assert!(state(&d).starts_with("split"), "{}", state(&d));
    let frozen = tree(&v.copy_path("d"));
    let cloned = tree(&dc);
    assert_eq!(frozen.len(), cloned.len());
    for (a, b) in frozen.iter().zip(&cloned) {
        assert_eq!((&a.0, &a.1, &a.3), (&b.0, &b.1, &b.3), "object {}", a.0);
        assert_same(&a.0, &b.2, &a.2);
    }
    // The hard link is one clone under two names.
    assert_eq!(
        std::fs::metadata(dc.join("big")).unwrap().ino(),
        std::fs::metadata(dc.join("hard")).unwrap().ino()
    );
    assert_eq!(std::fs::metadata(dc.join("big")).unwrap().nlink(), 2);

    // Writes to the clone leave the source and its frozen copy alone.
    write_at(&dc.join("big"), 100, b"clone");
    write_at(&dc.join("sub/f5"), 0, b"clone");
    std::fs::write(dc.join("new"), b"new").unwrap();
    std::fs::remove_file(dc.join("sub/f6")).unwrap();
    assert_same(
        "source big",
        &read_all(&d.join("big")),
        &block(99, 0, (3 * MIB) as usize),
    );
    assert_same(
        "frozen f5",
        &read_all(&v.copy_path("d/sub/f5")),
        &block(5, 0, 5 * 37_000),
    );
    assert_eq!(&read_all(&dc.join("hard"))[100..105], b"clone");
    assert!(d.join("sub/f6").exists());

    // A linked clone stays out of the directory pair: rename and link are EXDEV (`mv`
    // would copy).
    for r in [
        std::fs::rename(dc.join("sub/f5"), d.join("moved")),
        std::fs::rename(dc.join("sub"), d.join("movedsub")),
        std::fs::hard_link(dc.join("sub/f5"), d.join("linked")),
    ] {
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EXDEV));
    }
    // Single files of the split directory: one unchanged since the split (its live
    // inode is the instant's), one changed since (the pair's record).
    let (f7, f8) = (v.path("f7c"), v.path("f8c"));
    ok(&["clone", s(&d.join("sub/f7")), s(&f7)]);
    write_at(&d.join("sub/f8"), 10, b"changed");
    ok(&["clone", s(&d.join("sub/f8")), s(&f8)]);
    assert_same("f7 clone", &read_all(&f7), &block(7, 0, 7 * 37_000));
    assert_same("f8 clone", &read_all(&f8), &block(8, 0, 8 * 37_000));
    write_at(&f7, 0, b"mine");
    assert_same(
        "source f7",
        &read_all(&d.join("sub/f7")),
        &block(7, 0, 7 * 37_000),
    );
    ok(&["clone", "--detach", s(&f7)]);
    ok(&["clone", "--detach", s(&f8)]);
    // The source's frozen copy stays while the clone depends on it.
    for op in ["release", "update", "resync"] {
        let (good, out) = run(&[op, s(&d)]);
        assert!(!good, "{op} of the source succeeded");
        assert!(out.contains("Device or resource busy"), "{op}: {out}");
        assert!(
            out.contains(s(&dc)),
            "{op}: the message names the clone: {out}"
        );
    }
    let dv = std::fs::read(v.copy_path("d/big")).unwrap();
    ok(&["clone", "--detach", s(&dc)]);
    let status = ok(&["status", s(&v.mnt)]);
    assert!(
        !status.contains("/dc"),
        "detached clones are not listed: {status}"
    );
    ok(&["release", s(&d)]);
    // The clone stands alone now.
    let mut want = dv.clone();
    want[100..105].copy_from_slice(b"clone");
    assert_same("detached big", &read_all(&dc.join("big")), &want);
    let mut f5 = block(5, 0, 5 * 37_000);
    f5[..5].copy_from_slice(b"clone");
    assert_same("detached f5", &read_all(&dc.join("sub/f5")), &f5);
    assert_same(
        "detached f9",
        &read_all(&dc.join("sub/f9")),
        &block(9, 0, 9 * 37_000),
    );
    v.umount();
    v.fsck();
}

#[test]
fn a_clone_can_itself_be_split_and_cloned() {
    let mut v = Vol::new("2G");
    v.mount();
    let f = v.path("f");
    let orig = block(7, 0, (2 * MIB + 3) as usize);
    std::fs::write(&f, &orig).unwrap();
    let c = v.path("c");
    ok(&["clone", s(&f), s(&c)]);
    write_at(&c, 70_000, b"first");
    let mut model = orig.clone();
    model[70_000..70_005].copy_from_slice(b"first");
    // Splitting the clone detaches it (its frozen copy holds its own tracks).
    ok(&["split", s(&c)]);
    assert!(state(&c).starts_with("split"), "{}", state(&c));
    write_at(&c, 0, b"second");
    assert_same("frozen clone", &read_all(&v.copy_path("c")), &model);
    let mut live = model.clone();
    live[..6].copy_from_slice(b"second");
    assert_same("live clone", &read_all(&c), &live);
    // The source no longer has a clone: it can be released.
    ok(&["release", s(&f)]);
    // A clone of the clone's frozen copy.
    let c2 = v.path("c2");
    ok(&["clone", s(&c), s(&c2)]);
    assert_same("clone of clone", &read_all(&c2), &model);
    let (good, out) = run(&["release", s(&c)]);
    assert!(!good && out.contains(s(&c2)), "{out}");
    v.umount();
    v.fsck();
}

/// kill -9 while a writer rewrites 4 KiB blocks of a clone: after the remount every block
/// is its frozen content or a version the writer wrote there (never the zeros of a track
/// mapped before its fill reached the volume), fsync'd versions are kept, and the source
/// still refuses release.
#[test]
fn clones_survive_kill9_under_writes() {
    let mut v = Vol::new("2G");
    v.mount();
    let blocks = 16384u64; // 64 MiB, 1024 tracks: first writes (fills) go on all along
    let size = blocks * 4096;
    let orig = block(5, 0, size as usize);
    let f = v.path("f");
    std::fs::write(&f, &orig).unwrap();
    ok(&["split", s(&f)]);
    let c = v.path("c");
    ok(&["clone", s(&f), s(&c)]);
    // written[b] = versions started at block b; durable[b] = version fsync'd last.
    let written = Arc::new(Mutex::new(vec![Vec::<u64>::new(); blocks as usize]));
    let durable = Arc::new(Mutex::new(vec![0u64; blocks as usize]));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (written, durable, stop, c) =
            (written.clone(), durable.clone(), stop.clone(), c.clone());
        std::thread::spawn(move || {
            let Ok(file) = OpenOptions::new().write(true).open(&c) else {
                return 0;
            };
            let mut x: u64 = 0x9e37_79b9;
            let mut version = 0;
            let mut pending = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // Mostly one block per track region, so most writes need a fill.
                let b = x % blocks;
                version += 1;
                written.lock().unwrap()[b as usize].push(version);
                if file
                    .write_all_at(&block(b, version, 4096), b * 4096)
                    .is_err()
                {
                    break;
                }
                pending.push((b, version));
                if version % 16 == 0 {
                    if file.sync_all().is_err() {
                        break;
                    }
                    let mut d = durable.lock().unwrap();
                    for (b, ver) in pending.drain(..) {
                        d[b as usize] = ver;
                    }
                }
            }
            version
        })
    };
    std::thread::sleep(Duration::from_millis(2500));
    v.kill9();
    stop.store(true, Ordering::Relaxed);
    let n = writer.join().unwrap();
    assert!(n > 50, "only {n} writes before the kill");
    v.mount();
    let got = read_all(&c);
    assert_eq!(got.len() as u64, size);
    let written = written.lock().unwrap();
    let durable = durable.lock().unwrap();
    let mut rewritten = 0;
    for b in 0..blocks as usize {
        let at = &got[b * 4096..(b + 1) * 4096];
        let frozen = &orig[b * 4096..(b + 1) * 4096];
        let version = written[b]
            .iter()
            .copied()
            .find(|&ver| at == block(b as u64, ver, 4096).as_slice());
        match version {
            Some(ver) => {
                rewritten += 1;
                assert!(
                    ver >= durable[b],
                    "block {b}: version {ver} older than fsync'd {}",
                    durable[b]
                );
            }
            None => {
                assert!(
                    at == frozen,
                    "block {b}: neither frozen nor written (zeros: {})",
                    at.iter().all(|&x| x == 0)
                );
                assert_eq!(durable[b], 0, "block {b}: fsync'd version lost");
            }
        }
    }
    eprintln!("{n} writes, {rewritten} blocks rewritten, all others frozen");
    assert_same(
        "frozen copy after kill",
        &read_all(&v.copy_path("f")),
        &orig,
    );
    let (good, out) = run(&["release", s(&f)]);
    assert!(!good && out.contains(s(&c)), "dependency after kill: {out}");
    v.umount();
    v.fsck();
}

fn pg_bin() -> Option<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| Some(e.ok()?.path().join("bin")))
        .filter(|p| p.join("postgres").exists())
        .collect();
    v.sort();
    v.pop()
}

fn as_pg(bin: &Path, tool: &str, args: &[&str]) -> (bool, String) {
    let o = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(bin.join(tool))
        .args(args)
        .output()
        .unwrap();
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

/// sum(abalance), sum(bbalance), sum(tbalance), sum(delta) of a pgbench database.
fn tpcb_sums(bin: &Path, sock: &Path, port: u16) -> Vec<i64> {
    let (good, out) = as_pg(
        bin,
        "psql",
        &[
            "-h",
            s(sock),
            "-p",
            &port.to_string(),
            "-At",
            "-c",
            "select (select sum(abalance) from pgbench_accounts), \
             (select sum(bbalance) from pgbench_branches), \
             (select sum(tbalance) from pgbench_tellers), \
             (select coalesce(sum(delta), 0) from pgbench_history)",
            "postgres",
        ],
    );
    assert!(good, "psql: {out}");
    out.trim().split('|').map(|x| x.parse().unwrap()).collect()
}

struct Pg {
    bin: PathBuf,
    data: PathBuf,
}

impl Drop for Pg {
    fn drop(&mut self) {
        let _ = as_pg(
            &self.bin,
            "pg_ctl",
            &["-D", s(&self.data), "-m", "immediate", "stop"],
        );
    }
}

fn pg_start(bin: &Path, data: &Path, sock: &Path, port: u16) -> Pg {
    let opts = format!(
        "-p {port} -k {} -c listen_addresses= -c shared_buffers=32MB",
        s(sock)
    );
    let log = sock.join("server.log");
    let (good, out) = as_pg(
        bin,
        "pg_ctl",
        &["-D", s(data), "-l", s(&log), "-w", "-o", &opts, "start"],
    );
    assert!(
        good,
        "postgres on {}: {out}\n{}",
        data.display(),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    Pg {
        bin: bin.to_path_buf(),
        data: data.to_path_buf(),
    }
}

/// The use to prove: a second PostgreSQL on a clone of a running cluster's data
/// directory, split under a TPC-B load, in seconds and without copying the data; the
/// clone's database satisfies TPC-B's invariant, and both clusters run on.
#[test]
fn postgres_starts_on_a_clone_of_a_running_clusters_data_directory() {
    let Some(bin) = pg_bin() else {
        eprintln!(
            "SKIPPED: no PostgreSQL server in /usr/lib/postgresql (apt-get install postgresql)"
        );
        return;
    };
    let mut v = Vol::new("4G");
    v.mount_opts("allow_other");
    sh(&format!("chmod 755 {}", s(v.dir.path())));
    let pg = v.path("pg");
    std::fs::create_dir(&pg).unwrap();
    sh(&format!("chown postgres {}", s(&pg)));
    let data = pg.join("data");
    let (good, out) = as_pg(&bin, "initdb", &["-D", s(&data), "-A", "trust"]);
    assert!(good, "initdb: {out}");
    let socks = tempfile::Builder::new()
        .prefix("clone-pg")
        .tempdir_in("/tmp")
        .unwrap();
    let (s1, s2) = (socks.path().join("a"), socks.path().join("b"));
    for d in [&s1, &s2] {
        std::fs::create_dir(d).unwrap();
    }
    sh(&format!(
        "chmod 755 {0} && chown postgres {0}/a {0}/b",
        s(socks.path())
    ));
    let base = 20_000 + (std::process::id() % 20_000) as u16;
    let (p1, p2) = (base, base + 1);
    let first = pg_start(&bin, &data, &s1, p1);
    let (good, out) = as_pg(
        &bin,
        "pgbench",
        &[
            "-h",
            s(&s1),
            "-p",
            &p1.to_string(),
            "-i",
            "-s",
            "5",
            "-q",
            "postgres",
        ],
    );
    assert!(good, "pgbench -i: {out}");
    // TPC-B load on the first cluster while its data directory is cloned (`-n`: no
    // truncation of pgbench_history, so the invariant holds across runs).
    let load = {
        let (bin, s1) = (bin.clone(), s1.clone());
        std::thread::spawn(move || {
            as_pg(
                &bin,
                "pgbench",
                &[
                    "-h",
                    s(&s1),
                    "-p",
                    &p1.to_string(),
                    "-n",
                    "-c",
                    "4",
                    "-j",
                    "2",
                    "-T",
                    "8",
                    "postgres",
                ],
            )
        })
    };
    std::thread::sleep(Duration::from_secs(3));
    let clone = v.path("pgclone");
    let t = Instant::now();
    // A live data directory: split (one instant for the whole tree) and cloned.
    ok(&["clone", s(&data), s(&clone)]);
    let took = t.elapsed();
    let du = |p: &Path| {
        let o = Command::new("du").args(["-sk"]).arg(p).output().unwrap();
        String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .next()
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    let (src_kib, clone_kib) = (du(&data), du(&clone));
    eprintln!("clone of the data directory ({src_kib} KiB): {took:?}, clone uses {clone_kib} KiB");
    assert!(took < Duration::from_secs(10), "clone took {took:?}");
    assert!(
        clone_kib * 20 < src_kib,
        "the clone copied data: {clone_kib} KiB"
    );
    // The first postmaster is alive: its pid file in the clone is stale.
    std::fs::remove_file(clone.join("postmaster.pid")).unwrap();
    let t = Instant::now();
    let second = pg_start(&bin, &clone, &s2, p2);
    eprintln!(
        "second postgres up (crash recovery included) in {:?}",
        t.elapsed()
    );
    let sums = tpcb_sums(&bin, &s2, p2);
    assert!(
        sums.iter().all(|&x| x == sums[0]),
        "TPC-B invariant on the clone: {sums:?}"
    );
    // The clone takes its own load; the first cluster's load ran on meanwhile.
    let (good, out) = as_pg(
        &bin,
        "pgbench",
        &[
            "-h",
            s(&s2),
            "-p",
            &p2.to_string(),
            "-n",
            "-c",
            "2",
            "-j",
            "2",
            "-T",
            "3",
            "postgres",
        ],
    );
    assert!(good, "pgbench on the clone: {out}");
    let (good, out) = load.join().unwrap();
    assert!(good, "pgbench on the first cluster: {out}");
    let on_clone = tpcb_sums(&bin, &s2, p2);
    assert!(on_clone.iter().all(|&x| x == on_clone[0]), "{on_clone:?}");
    let on_first = tpcb_sums(&bin, &s1, p1);
    assert!(on_first.iter().all(|&x| x == on_first[0]), "{on_first:?}");
    assert_ne!(on_clone[3], on_first[3], "two databases went separate ways");
    // Only root clones (a clone keeps owners and modes, set-uid bits too).
    let o = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(BIN)
        .args(["clone", s(&data), s(&pg.join("byuser"))])
        .output()
        .unwrap();
    assert!(
        !o.status.success()
            && String::from_utf8_lossy(&o.stderr).contains("Operation not permitted"),
        "clone by a non-root user: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    // The data directory's pair waits for the clone.
    let (good, out) = run(&["release", s(&data)]);
    assert!(!good && out.contains(s(&clone)), "{out}");
    drop(second);
    drop(first);
    ok(&["clone", "--detach", s(&clone)]);
    ok(&["release", s(&data)]);
    v.umount();
    v.fsck();
}
