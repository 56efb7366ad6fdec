//! Pair engine through a real mount: split under a running writer, update of changed
//! tracks, consistency groups, a real backup tool on the copy mount, and persistence.

mod common;

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use common::*;

const MIB: u64 = 1 << 20;

/// Done-when 1: a 1 GiB file being rewritten is split; the copy equals the content as
/// of the split (each concurrent write wholly in or out), the original keeps the new.
#[test]
fn split_under_a_running_writer_is_exact() {
    let mut v = Vol::new("4G");
    v.mount();
    let bs: u64 = 96 * 1024; // deliberately not track aligned
    let nblocks = 1024 * MIB / bs;
    let size = nblocks * bs;
    let path = v.path("big");
    {
        let f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut w = std::io::BufWriter::with_capacity(8 << 20, &f);
        for i in 0..nblocks {
            w.write_all(&block(i, 0, bs as usize)).unwrap();
        }
        w.flush().unwrap();
    }
    // Writer: rewrites random blocks with increasing versions, logging sequence numbers.
    let seq = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    // (block, version, start seq, end seq)
    let log = Arc::new(Mutex::new(Vec::<(u64, u64, u64, u64)>::new()));
    let writer = {
        let (seq, stop, log, path) = (seq.clone(), stop.clone(), log.clone(), path.clone());
        std::thread::spawn(move || {
            let f = OpenOptions::new().write(true).open(&path).unwrap();
            let mut x: u64 = 0x1234_5678;
            let mut version = 0;
            while !stop.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let b = x % nblocks;
                version += 1;
                let data = block(b, version, bs as usize);
                let s = seq.fetch_add(1, Ordering::SeqCst);
                f.write_all_at(&data, b * bs).unwrap();
                let e = seq.fetch_add(1, Ordering::SeqCst);
                log.lock().unwrap().push((b, version, s, e));
            }
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    let s0 = seq.fetch_add(1, Ordering::SeqCst);
    let t = std::time::Instant::now();
    setx(&path, "user.pairfs.split").unwrap();
    let split_time = t.elapsed();
    let s1 = seq.fetch_add(1, Ordering::SeqCst);
    std::thread::sleep(std::time::Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    println!("split of a 1 GiB file under writes took {split_time:?}");
    wait_state(&path, "split");
    let log = log.lock().unwrap().clone();
    let after_writes = log.iter().filter(|w| w.2 > s1).count();
    assert!(
        after_writes > 0,
        "the writer must keep writing after the split"
    );
    // For every block: the set of acceptable versions in the copy.
    let mut must: Vec<u64> = vec![0; nblocks as usize]; // latest completed before s0
    let mut may: Vec<Vec<u64>> = vec![Vec::new(); nblocks as usize]; // in flight
    for &(b, ver, s, e) in &log {
        if e < s0 {
            must[b as usize] = must[b as usize].max(ver);
        } else if s < s1 {
            may[b as usize].push(ver);
        }
    }
    let copy = std::fs::File::open(v.copy_path("big")).unwrap();
    assert_eq!(copy.metadata().unwrap().len(), size);
    let mut buf = vec![0u8; bs as usize];
    let mut inflight_seen = 0;
    for b in 0..nblocks {
        copy.read_exact_at(&mut buf, b * bs).unwrap();
        if buf == block(b, must[b as usize], bs as usize) {
            continue;
        }
        let hit = may[b as usize]
            .iter()
            .any(|&ver| ver > must[b as usize] && buf == block(b, ver, bs as usize));
        assert!(
            hit,
            "block {b} of the frozen copy is neither its split-time content nor a whole in-flight write"
        );
        inflight_seen += 1;
    }
    // The original has the newest version of every block.
    let mut newest: Vec<u64> = vec![0; nblocks as usize];
    for &(b, ver, _, _) in &log {
        newest[b as usize] = newest[b as usize].max(ver);
    }
    let orig = std::fs::File::open(&path).unwrap();
    for b in 0..nblocks {
        orig.read_exact_at(&mut buf, b * bs).unwrap();
        assert!(
            buf == block(b, newest[b as usize], bs as usize),
            "original block {b} lost a write"
        );
    }
    println!(
        "{} writes logged, {after_writes} after the split, {inflight_seen} in flight at the instant",
        log.len()
    );
    drop((orig, copy));
    v.umount();
    v.fsck();
}

/// Done-when 2: after changing 1% of the tracks, update copies exactly those tracks.
#[test]
fn update_copies_only_changed_tracks() {
    let mut v = Vol::new("2G");
    v.mount();
    let ts = 64 * 1024u64;
    let tracks = 4096u64; // 256 MiB
    let path = v.path("f");
    {
        let mut f = std::fs::File::create(&path).unwrap();
        for t in 0..tracks {
            f.write_all(&block(t, 0, ts as usize)).unwrap();
        }
    }
    setx(&path, "user.pairfs.split").unwrap();
    wait_state(&path, "split");
    let changed: Vec<u64> = (0..tracks).filter(|t| t % 100 == 7).collect();
    {
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        for &t in &changed {
            // A small write inside the track dirties the whole track.
            f.write_all_at(b"changed!", t * ts + 100).unwrap();
        }
    }
    assert_eq!(
        field(&state(&path), "dirty_tracks"),
        Some(changed.len() as u64)
    );
    setx(&path, "user.pairfs.update").unwrap();
    let s = wait_state(&path, "split");
    assert_eq!(field(&s, "last_copied"), Some(changed.len() as u64), "{s}");
    assert_eq!(read_all(&v.copy_path("f")), read_all(&path));
    // Wrong-state transitions.
    setx(&path, "user.pairfs.split").expect_err("split of a split pair");
    assert_eq!(
        setx(&path, "user.pairfs.bogus").unwrap_err().raw_os_error(),
        Some(libc::EINVAL)
    );
    setx(&path, "user.pairfs.resync").unwrap();
    wait_state(&path, "formed");
    // The copy mount drops the kernel's cached names of the old view right after the
    // change (a notifier thread), within its 1 s entry TTL at the latest.
    let gone = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while v.copy_path("f").exists() && std::time::Instant::now() < gone {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(
        !v.copy_path("f").exists(),
        "resync withdraws the frozen copy"
    );
    setx(&path, "user.pairfs.release").unwrap();
    assert_eq!(state(&path), "none");
    v.umount();
    v.fsck();
}

/// Done-when 3: a directory of 100 files split under concurrent writes gives copies
/// that are all of one instant.
#[test]
fn directory_split_is_one_instant() {
    let mut v = Vol::new("2G");
    v.mount();
    let dir = v.path("db");
    std::fs::create_dir(&dir).unwrap();
    for k in 0..100 {
        std::fs::write(dir.join(format!("f{k:03}")), 0u64.to_le_bytes()).unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, dir) = (stop.clone(), dir.clone());
        std::thread::spawn(move || {
            let files: Vec<_> = (0..100)
                .map(|k| {
                    OpenOptions::new()
                        .write(true)
                        .open(dir.join(format!("f{k:03}")))
                        .unwrap()
                })
                .collect();
            let mut g: u64 = 0;
            while !stop.load(Ordering::Relaxed) {
                g += 1;
                files[(g % 100) as usize]
                    .write_all_at(&g.to_le_bytes(), 0)
                    .unwrap();
            }
            g
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    setx(&dir, "user.pairfs.split").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let last = writer.join().unwrap();
    wait_state(&dir, "split");
    let vals: Vec<u64> = (0..100)
        .map(|k| {
            let b = std::fs::read(v.copy_path(&format!("db/f{k:03}"))).unwrap();
            u64::from_le_bytes(b[..8].try_into().unwrap())
        })
        .collect();
    let cut = *vals.iter().max().unwrap();
    assert!(
        cut > 0 && cut < last,
        "the split fell inside the write stream (cut {cut}, last {last})"
    );
    for (k, &val) in vals.iter().enumerate() {
        // The newest generation <= cut written to file k.
        let want = if cut >= k as u64 {
            cut - ((cut - k as u64) % 100)
        } else {
            0
        };
        let want = if want == 0 && k != 0 { 0 } else { want };
        assert_eq!(
            val, want,
            "file {k}: copies are not of one instant (cut {cut})"
        );
    }
    v.umount();
    v.fsck();
}

/// Done-when 4: restic backs up the copy mount while the original is rewritten; the
/// restore equals the split-time content.
#[test]
fn restic_backup_of_the_copy_mount_restores_split_content() {
    if std::process::Command::new("restic")
        .arg("version")
        .output()
        .is_err()
    {
        panic!("restic is not installed (apt-get install restic)");
    }
    let mut v = Vol::new("2G");
    v.mount();
    let dir = v.path("data");
    std::fs::create_dir(&dir).unwrap();
    let mut expect = Vec::new();
    for k in 0..20u64 {
        let content = block(k, 1, (k as usize + 1) * 200_000);
        std::fs::write(dir.join(format!("f{k}")), &content).unwrap();
        expect.push(content);
    }
    setx(&dir, "user.pairfs.split").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, dir) = (stop.clone(), dir.clone());
        std::thread::spawn(move || {
            let mut n = 2;
            while !stop.load(Ordering::Relaxed) {
                for k in 0..20u64 {
                    let mut f = OpenOptions::new()
                        .write(true)
                        .open(dir.join(format!("f{k}")))
                        .unwrap();
                    f.seek(SeekFrom::Start(k * 1000)).unwrap();
                    f.write_all(&block(k, n, 70_000)).unwrap();
                }
                n += 1;
            }
        })
    };
    let repo = v.dir.path().join("repo");
    let restore = v.dir.path().join("restore");
    let run = |args: &[&str]| {
        let out = std::process::Command::new("restic")
            .args(args)
            .env("RESTIC_PASSWORD", "test")
            .env("RESTIC_CACHE_DIR", v.dir.path().join("cache"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "restic {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&["init", "--repo", repo.to_str().unwrap()]);
    run(&[
        "backup",
        "--repo",
        repo.to_str().unwrap(),
        v.copy_path("data").to_str().unwrap(),
    ]);
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    run(&[
        "restore",
        "latest",
        "--repo",
        repo.to_str().unwrap(),
        "--target",
        restore.to_str().unwrap(),
    ]);
    let restored = restore.join(v.copy_path("data").strip_prefix("/").unwrap());
    for (k, content) in expect.iter().enumerate() {
        let got = std::fs::read(restored.join(format!("f{k}"))).unwrap();
        assert!(
            got == *content,
            "restored f{k} differs from its split-time content"
        );
        assert!(
            std::fs::read(dir.join(format!("f{k}"))).unwrap() != *content,
            "the original was rewritten"
        );
    }
    v.umount();
}

/// Done-when 5 (clean part; kill -9 is tests/kill.rs): the frozen copy survives
/// unmount and remount, and copying resumes.
#[test]
fn frozen_copy_survives_remount() {
    let mut v = Vol::new("2G");
    v.mount();
    let path = v.path("f");
    let original = block(1, 1, 64 * MIB as usize);
    std::fs::write(&path, &original).unwrap();
    setx(&path, "user.pairfs.split").unwrap();
    // Overwrite at once (copy-on-write) and unmount while the copier may still run.
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&block(2, 2, 8 * MIB as usize), 0).unwrap();
    f.set_len(10 * MIB).unwrap();
    drop(f);
    v.umount();
    v.fsck();
    v.mount();
    wait_state(&path, "split");
    assert!(
        read_all(&v.copy_path("f")) == original,
        "frozen copy changed across remount"
    );
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 10 * MIB);
    v.umount();
}

/// The mount root splits the whole volume; the copy image plus the metadata snapshot
/// mount read-only as the volume as of the split.
#[test]
fn whole_volume_split_mounts_as_a_snapshot() {
    let mut v = Vol::new("1G");
    v.mount();
    std::fs::create_dir_all(v.path("etc/app")).unwrap();
    std::fs::write(v.path("etc/app/conf"), b"v1").unwrap();
    std::fs::write(v.path("data"), block(9, 1, 5_000_000)).unwrap();
    std::os::unix::fs::symlink("etc/app/conf", v.path("conf-link")).unwrap();
    setx(&v.mnt, "user.pairfs.split").unwrap();
    std::fs::write(v.path("etc/app/conf"), b"v2 after the split").unwrap();
    std::fs::write(v.path("data"), b"rewritten").unwrap();
    std::fs::write(v.path("new-file"), b"born after").unwrap();
    wait_state(&v.mnt, "split");
    let snap = v.dir.path().join("snap");
    std::fs::create_dir(&snap).unwrap();
    v.mount_snapshot(&snap);
    let r = std::panic::catch_unwind(|| {
        assert_eq!(std::fs::read(snap.join("etc/app/conf")).unwrap(), b"v1");
        assert!(std::fs::read(snap.join("data")).unwrap() == block(9, 1, 5_000_000));
        assert_eq!(std::fs::read(snap.join("conf-link")).unwrap(), b"v1");
        assert!(!snap.join("new-file").exists());
        assert!(
            std::fs::write(snap.join("x"), b"no").is_err(),
            "the snapshot is read-only"
        );
    });
    let out = pairfs(&["umount", snap.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "umount snapshot: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    r.unwrap();
    // The frozen copies are also on the copy mount at their paths.
    assert_eq!(std::fs::read(v.copy_path("etc/app/conf")).unwrap(), b"v1");
    v.umount();
    v.fsck();
}

/// A split file that is deleted keeps its frozen copy (its space pinned); the pair is
/// released by id on the mount root, which frees the space.
#[test]
fn deleted_file_keeps_its_copy_until_released_by_id() {
    let mut v = Vol::new("1G");
    v.mount();
    let content = block(5, 5, 32 * MIB as usize);
    std::fs::write(v.path("gone"), &content).unwrap();
    setx(&v.path("gone"), "user.pairfs.split").unwrap();
    wait_state(&v.path("gone"), "split");
    let free = |p: &std::path::Path| {
        let out = std::process::Command::new("stat")
            .args(["-f", "-c", "%a*%S"])
            .arg(p)
            .output()
            .unwrap();
        let s = String::from_utf8(out.stdout).unwrap();
        let (a, b) = s.trim().split_once('*').unwrap();
        a.parse::<u64>().unwrap() * b.parse::<u64>().unwrap()
    };
    let before = free(&v.mnt);
    std::fs::remove_file(v.path("gone")).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500)); // one commit interval
    assert!(
        read_all(&v.copy_path("gone")) == content,
        "the frozen copy must outlive the file"
    );
    assert!(
        free(&v.mnt) <= before + MIB,
        "pinned space must stay in use"
    );
    let pairs = String::from_utf8(
        std::process::Command::new("getfattr")
            .args(["--only-values", "-n", "user.pairfs.pairs"])
            .arg(&v.mnt)
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(
        pairs.contains(&format!("pinned_bytes={}", 32 * MIB)),
        "{pairs}"
    );
    let id = field(&pairs, "pair").unwrap();
    let st = std::process::Command::new("setfattr")
        .args(["-n", "user.pairfs.release", "-v", &id.to_string()])
        .arg(&v.mnt)
        .status()
        .unwrap();
    assert!(st.success());
    assert!(!v.copy_path("gone").exists());
    assert!(
        free(&v.mnt) >= before + 30 * MIB,
        "release must free the pinned space"
    );
    v.umount();
    v.fsck();
}
