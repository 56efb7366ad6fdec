//! Metadata on demand: inodes leave the cache when the kernel forgets them or the cache
//! is over budget, and read back identical; mount reads no inode rows; pair membership
//! survives eviction; orphans go at mount; a schema version 1 database still mounts.

use std::path::Path;

use pairfs::core::fs::{Ctx, Fs, Options, ROOT, SetAttr};
use pairfs::core::volfile::{self, Paths};
use pairfs::meta::Meta;
use pairfs::snap::engine::Op;
use pairfs::store::volume::MemVolume;

const TS: u64 = 4096;

fn open(paths: &Paths, budget: usize) -> Fs {
    let meta = Meta::open(&paths.meta, false).unwrap();
    let loaded = meta.load().unwrap();
    meta.set_clean(false).unwrap();
    let g = meta.geometry().clone();
    let opts = Options {
        meta_path: Some(paths.meta.clone()),
        cache_inodes: budget,
        ..Options::default()
    };
    // Data is not the point here: fresh in-memory images each time (metadata only).
    let vol = MemVolume::new(g.size as usize);
    let copy = MemVolume::new(g.size as usize);
    Fs::new(meta, loaded, Box::new(vol), Box::new(copy), opts).unwrap()
}

fn volume(dir: &Path) -> Paths {
    let paths = Paths::new(&dir.join("v"), None, None);
    volfile::mkfs(&paths, 4096 * TS, TS, false).unwrap();
    paths
}

fn ctx() -> Ctx {
    Ctx {
        uid: 0,
        gid: 0,
        umask: 0,
    }
}

/// Every name beneath the root with its attributes, xattrs and link target, by walking
/// readdir and lookup (what a `find -ls` sees).
fn snapshot(fs: &Fs) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![(ROOT, String::new())];
    while let Some((dir, path)) = stack.pop() {
        let mut cookie = 0;
        loop {
            let ents = fs.readdir(dir, cookie).unwrap();
            if ents.is_empty() {
                break;
            }
            for (c, a, name) in ents {
                cookie = c;
                if name == b"." || name == b".." {
                    continue;
                }
                let p = format!("{path}/{}", String::from_utf8_lossy(&name));
                let l = fs.lookup(dir, &name).unwrap();
                assert_eq!(l.row, a.row);
                let x = fs.listxattr(l.row.ino).unwrap();
                let t = fs.readlink(l.row.ino).ok();
                out.push(format!("{p} {:?} {} {x:?} {t:?}", l.row, l.allocated));
                if l.row.kind == libc::S_IFDIR {
                    stack.push((l.row.ino, p));
                }
                fs.forget(l.row.ino, 1);
            }
        }
    }
    out.sort();
    out
}

fn tree(fs: &Fs, dirs: usize, files: usize) {
    for d in 0..dirs {
        let di = fs
            .create_node(
                ctx(),
                ROOT,
                format!("d{d}").as_bytes(),
                libc::S_IFDIR | 0o755,
                0,
                None,
            )
            .unwrap()
            .row
            .ino;
        for f in 0..files {
            let a = fs
                .create_node(
                    ctx(),
                    di,
                    format!("f{f}").as_bytes(),
                    libc::S_IFREG | 0o644,
                    0,
                    None,
                )
                .unwrap();
            if f % 3 == 0 {
                fs.write(a.row.ino, (f as u64) * 1000, &[f as u8 + 1; 5000])
                    .unwrap();
            }
            if f % 5 == 0 {
                fs.setxattr(a.row.ino, b"user.k", format!("v{f}").as_bytes(), 0)
                    .unwrap();
            }
            if f % 7 == 0 {
                fs.link(a.row.ino, ROOT, format!("h{d}-{f}").as_bytes())
                    .unwrap();
                fs.forget(a.row.ino, 1);
            }
            fs.forget(a.row.ino, 1);
        }
        fs.create_node(
            ctx(),
            di,
            b"sym",
            libc::S_IFLNK | 0o777,
            0,
            Some(b"f1".to_vec()),
        )
        .unwrap();
        fs.forget(di + files as u64 + 1, 1);
        fs.forget(di, 1);
    }
}

#[test]
fn evicted_inodes_read_back_identical_and_the_cache_stays_in_budget() {
    let dir = tempfile::tempdir().unwrap();
    let paths = volume(dir.path());
    let fs = open(&paths, 64);
    tree(&fs, 6, 40);
    let before = snapshot(&fs);
    fs.commit(Vec::new()).unwrap();
    // Committed and forgotten by the "kernel": only the root stays.
    assert_eq!(
        fs.cache_stats(),
        (1, 0),
        "everything clean and forgotten leaves"
    );
    let after = snapshot(&fs);
    assert_eq!(before, after);
    assert!(fs.cache_stats().0 <= 64, "cache {:?}", fs.cache_stats());
    // A file read after eviction reads its data back.
    let d0 = fs.lookup(ROOT, b"d0").unwrap().row.ino;
    let f3 = fs.lookup(d0, b"f3").unwrap().row.ino;
    assert_eq!(fs.read(f3, 3000, 5000).unwrap(), vec![4u8; 5000]);
    fs.shutdown().unwrap();
    drop(fs);
    // Remount reads no inode rows and sees the same tree.
    let fs = open(&paths, 64);
    assert_eq!(fs.cache_stats(), (0, 0), "mount loaded inodes");
    assert_eq!(fs.statfs().inodes, 1 + 6 * 42);
    assert_eq!(snapshot(&fs), before);
}

#[test]
fn a_looked_up_inode_stays_until_forgotten_and_dirty_ones_until_committed() {
    let dir = tempfile::tempdir().unwrap();
    let paths = volume(dir.path());
    let fs = open(&paths, 64);
    let a = fs
        .create_node(ctx(), ROOT, b"a", libc::S_IFREG | 0o644, 0, None)
        .unwrap()
        .row
        .ino;
    fs.forget(a, 1);
    assert_eq!(fs.cache_stats().0, 2, "dirty inode evicted");
    fs.commit(Vec::new()).unwrap();
    assert_eq!(fs.cache_stats().0, 1);
    fs.lookup(ROOT, b"a").unwrap();
    fs.lookup(ROOT, b"a").unwrap();
    fs.forget(a, 1);
    assert_eq!(fs.cache_stats(), (2, 1));
    // An open handle keeps it too.
    let fh = fs.open(a, true).unwrap();
    fs.forget(a, 1);
    assert_eq!(fs.cache_stats(), (2, 0));
    fs.setattr(
        ctx(),
        a,
        SetAttr {
            size: Some(10),
            ..SetAttr::default()
        },
    )
    .unwrap();
    fs.release(fh).unwrap();
    fs.commit(Vec::new()).unwrap();
    assert_eq!(fs.getattr(a).unwrap().row.size, 10);
}

#[test]
fn a_split_directory_member_loaded_again_still_keeps_its_frozen_data() {
    let dir = tempfile::tempdir().unwrap();
    let paths = volume(dir.path());
    let fs = open(&paths, 64);
    let d = fs
        .create_node(ctx(), ROOT, b"d", libc::S_IFDIR | 0o755, 0, None)
        .unwrap()
        .row
        .ino;
    let sub = fs
        .create_node(ctx(), d, b"sub", libc::S_IFDIR | 0o755, 0, None)
        .unwrap()
        .row
        .ino;
    let f = fs
        .create_node(ctx(), sub, b"f", libc::S_IFREG | 0o644, 0, None)
        .unwrap()
        .row
        .ino;
    fs.write(f, 0, &[1u8; 3 * TS as usize]).unwrap();
    let g = fs
        .create_node(ctx(), d, b"g", libc::S_IFREG | 0o644, 0, None)
        .unwrap()
        .row
        .ino;
    fs.write(g, 0, &[7u8; TS as usize]).unwrap();
    fs.control(d, Op::Split).unwrap();
    // Moved out of the directory after the split: still a member (its frozen map).
    fs.rename(d, b"g", ROOT, b"g", 0).unwrap();
    fs.commit(Vec::new()).unwrap();
    for i in [f, g, sub, d] {
        fs.forget(i, 1);
    }
    assert_eq!(fs.cache_stats().0, 1, "not evicted");
    // Loaded again through lookups: the pair is found (inherited, frozen map).
    let sub2 = fs.lookup(d, b"sub").unwrap().row.ino;
    let f2 = fs.lookup(sub2, b"f").unwrap().row.ino;
    let g2 = fs.lookup(ROOT, b"g").unwrap().row.ino;
    // g first: copy-on-write also copies the other pending tracks of its group.
    fs.write(g2, 0, &[8u8; TS as usize]).unwrap();
    fs.write(f2, 0, &[2u8; 3 * TS as usize]).unwrap();
    let frozen = |ino: u64| {
        let (id, idx, o) = fs
            .engine
            .frozen_objects(&fs)
            .into_iter()
            .find(|o| o.2.ino == ino)
            .unwrap();
        fs.engine
            .read_frozen(&fs, id, idx, 0, o.attr.size as u32)
            .unwrap()
    };
    assert_eq!(frozen(f), vec![1u8; 3 * TS as usize]);
    assert_eq!(frozen(g), vec![7u8; TS as usize]);
    // A file created in the directory after eviction of the directory joins the pair.
    fs.forget(sub2, 1);
    fs.forget(d, 1);
    fs.commit(Vec::new()).unwrap();
    let sub3 = fs.lookup(d, b"sub").unwrap().row.ino;
    let n = fs
        .create_node(ctx(), sub3, b"n", libc::S_IFREG | 0o644, 0, None)
        .unwrap()
        .row
        .ino;
    let st = fs.engine.status_of(&fs, n).unwrap().expect("member");
    assert_eq!(st.scope, "dir");
    // Not in the frozen map: loaded again, it inherits its directory's pair.
    let cached = fs.cache_stats().0;
    fs.forget(n, 1);
    fs.forget(sub3, 1);
    fs.commit(Vec::new()).unwrap();
    assert_eq!(fs.cache_stats().0, cached - 2, "n and sub evicted");
    let sub4 = fs.lookup(d, b"sub").unwrap().row.ino;
    let n2 = fs.lookup(sub4, b"n").unwrap().row.ino;
    assert!(
        fs.engine.status_of(&fs, n2).unwrap().is_some(),
        "lost its pair"
    );
}

#[test]
fn an_orphan_is_removed_at_mount_by_an_indexed_query() {
    let dir = tempfile::tempdir().unwrap();
    let paths = volume(dir.path());
    let fs = open(&paths, 64);
    let a = fs
        .create_node(ctx(), ROOT, b"a", libc::S_IFREG | 0o644, 0, None)
        .unwrap()
        .row
        .ino;
    fs.write(a, 0, &[1u8; 10 * TS as usize]).unwrap();
    let fh = fs.open(a, true).unwrap();
    fs.unlink(ROOT, b"a", false).unwrap();
    fs.commit(Vec::new()).unwrap();
    let free_open = fs.statfs().free;
    let _ = fh;
    drop(fs); // a crash: the orphan's row (nlink 0) is in the database
    let fs = open(&paths, 64);
    assert_eq!(fs.statfs().inodes, 1);
    fs.commit(Vec::new()).unwrap();
    assert_eq!(fs.statfs().free, free_open + 10);
    assert!(fs.getattr(a).is_err());
}

#[test]
fn a_schema_version_1_database_mounts_and_is_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let paths = volume(dir.path());
    {
        let fs = open(&paths, 64);
        tree(&fs, 2, 5);
        fs.shutdown().unwrap();
    }
    {
        let c = rusqlite::Connection::open(&paths.meta).unwrap();
        c.execute_batch(
            "DROP INDEX dirents_ino; DROP INDEX frozen_ino; DROP INDEX inodes_unlinked;
             DELETE FROM super WHERE key = 'inode_count';
             UPDATE super SET value = '1' WHERE key = 'schema_version';",
        )
        .unwrap();
    }
    // Read-only: mounts without migrating.
    let m = Meta::open(&paths.meta, true).unwrap();
    assert_eq!(m.load().unwrap().inode_count, 1 + 2 * 7);
    drop(m);
    let fs = open(&paths, 64);
    assert_eq!(fs.statfs().inodes, 1 + 2 * 7);
    let d1 = fs.lookup(ROOT, b"d1").unwrap().row.ino;
    assert!(fs.lookup(d1, b"f4").is_ok());
    drop(fs);
    let c = rusqlite::Connection::open(&paths.meta).unwrap();
    let v: String = c
        .query_row(
            "SELECT value FROM super WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(v, pairfs::meta::SCHEMA_VERSION.to_string());
    let n: u64 = c
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'index' AND name = 'dirents_ino'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(n, 1);
}

#[test]
fn fsck_checks_what_mount_no_longer_reads() {
    let dir = tempfile::tempdir().unwrap();
    let paths = volume(dir.path());
    {
        let fs = open(&paths, 64);
        tree(&fs, 2, 3);
        fs.shutdown().unwrap();
    }
    let r = pairfs::cli::fsck::fsck(&paths, false).unwrap();
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    // A directory cycle detached from the root, and a wrong stored inode count.
    {
        let c = rusqlite::Connection::open(&paths.meta).unwrap();
        let d0: u64 = c
            .query_row(
                "SELECT ino FROM dirents WHERE parent = 1 AND name = x'6430'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        let d1: u64 = c
            .query_row(
                "SELECT ino FROM dirents WHERE parent = 1 AND name = x'6431'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        c.execute("DELETE FROM dirents WHERE parent = 1 AND ino = ?1", [d0])
            .unwrap();
        c.execute("INSERT INTO dirents VALUES (?1, x'6c6f6f70', ?2)", [d1, d0])
            .unwrap();
        c.execute("DELETE FROM dirents WHERE parent = 1 AND ino = ?1", [d1])
            .unwrap();
        c.execute("INSERT INTO dirents VALUES (?1, x'6261636b', ?2)", [d0, d1])
            .unwrap();
        c.execute("UPDATE super SET value = '5' WHERE key = 'inode_count'", [])
            .unwrap();
    }
    let r = pairfs::cli::fsck::fsck(&paths, false).unwrap();
    let all = r.problems.join("\n");
    assert!(all.contains("not reachable from the root"), "{all}");
    assert!(all.contains("stored inode count 5"), "{all}");
    let r = pairfs::cli::fsck::fsck(&paths, true).unwrap();
    assert!(
        r.fixed.iter().any(|f| f.contains("inode count")),
        "{:?}",
        r.fixed
    );
    let c = rusqlite::Connection::open(&paths.meta).unwrap();
    let n: String = c
        .query_row(
            "SELECT value FROM super WHERE key = 'inode_count'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let rows: u64 = c
        .query_row("SELECT count(*) FROM inodes", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, rows.to_string());
}
