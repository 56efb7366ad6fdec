//! Hostile input: everything that reads untrusted bytes is fed random or corrupted
//! input. Nothing may panic; bad input is refused with an error (or, where it is
//! harmless, accepted). Counts of executions are printed.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use pairfs::core::fs::{Ctx, Options, ROOT};
use pairfs::core::volfile::{self, Paths};
use pairfs::meta::Geometry;
use pairfs::snap::engine::Op;
use proptest::prelude::*;

fn geo() -> Geometry {
    Geometry {
        uuid: "0123456789abcdef0123456789abcdef".into(),
        size: 1 << 24,
        track_size: 4096,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn image_headers(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
        prop_assert!(volfile::check_header(&bytes, b"PAIRFSV1", &geo(), "volume").is_err() || bytes.len() >= 48);
    }

    #[test]
    fn extent_blobs(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = pairfs::meta::decode_extents(&bytes);
    }

    #[test]
    fn bitmap_chunks(ci in any::<u64>(), bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let mut t = pairfs::core::trackset::TrackSet::new();
        let r = t.load_chunk(ci, &bytes);
        prop_assert_eq!(r.is_ok(), bytes.len() == 512);
    }

    #[test]
    fn sizes(s in ".{0,30}") {
        let _ = pairfs::cli::size::parse_size(&s);
    }

    #[test]
    fn cli_arguments(args in proptest::collection::vec("[-a-z0-9=,./]{0,12}", 0..6)) {
        use clap::Parser;
        let mut v = vec!["pairfs".to_string()];
        v.extend(args);
        let _ = pairfs::cli::args::Cli::try_parse_from(v);
    }
}

/// A small volume with files, a directory, a symlink, xattrs and a split pair.
fn sample(dir: &Path) -> Paths {
    let p = Paths::new(&dir.join("v"), None, None);
    volfile::mkfs(&p, 4 << 20, 4096, false).unwrap();
    let (fs, lock) = volfile::open(&p, Options::default()).unwrap();
    let c = Ctx::default();
    let d = fs
        .create_node(c, ROOT, b"d", libc::S_IFDIR | 0o755, 0, None)
        .unwrap()
        .row
        .ino;
    for k in 0..4u8 {
        let f = fs
            .create_node(c, d, &[b'f', b'0' + k], libc::S_IFREG | 0o644, 0, None)
            .unwrap()
            .row
            .ino;
        fs.write(f, 0, &vec![k; 10_000 * (k as usize + 1)]).unwrap();
        fs.setxattr(f, b"user.k", &[k], 0).unwrap();
    }
    fs.create_node(c, d, b"s", libc::S_IFLNK | 0o777, 0, Some(b"f0".to_vec()))
        .unwrap();
    fs.control(d, Op::Split).unwrap();
    fs.shutdown().unwrap();
    drop((fs, lock));
    p
}

fn walk(p: &Paths) -> Result<(), String> {
    let (fs, _lock) = volfile::open(p, Options::default()).map_err(|e| e.to_string())?;
    let mut stack = vec![ROOT];
    let mut n = 0;
    while let Some(ino) = stack.pop() {
        n += 1;
        if n > 1000 {
            break;
        }
        if let Ok(entries) = fs.readdir(ino, 0) {
            for (_, a, name) in entries {
                if name != b"." && name != b".." && a.row.kind == libc::S_IFDIR {
                    stack.push(a.row.ino);
                } else if a.row.kind == libc::S_IFREG {
                    let _ = fs.read(a.row.ino, 0, 1 << 16);
                    let _ = fs.listxattr(a.row.ino);
                }
            }
        }
    }
    for o in fs.engine.frozen_objects(&fs) {
        let _ = fs.engine.read_frozen(&fs, o.0, o.1, 0, 1 << 16);
    }
    let _ = fs.engine.all_status(&fs);
    let mut c = std::collections::BTreeMap::new();
    for _ in 0..50 {
        if fs.engine.copy_round(&fs, &mut c) == 0 {
            break;
        }
    }
    Ok(())
}

struct X(u64);
impl X {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn corrupted_metadata_rows_never_panic() {
    let base = tempfile::tempdir().unwrap();
    let good = sample(base.path());
    let mut x = X(0xC0FFEE);
    let values = [
        "-1",
        "0",
        "1",
        "2",
        "3",
        "4095",
        "1023",
        "9223372036854775807",
        "'x'",
        "NULL",
        "X'00ff'",
        "16384",
        "40960",
    ];
    let stmts = [
        "UPDATE inodes SET kind = {v} WHERE ino = (SELECT ino FROM inodes ORDER BY random() LIMIT 1)",
        "UPDATE inodes SET size = {v} WHERE ino = (SELECT ino FROM inodes ORDER BY random() LIMIT 1)",
        "UPDATE inodes SET nlink = {v}",
        "UPDATE extents SET vtrack = {v} WHERE rowid IN (SELECT rowid FROM extents LIMIT 1)",
        "UPDATE extents SET vtrack = {v}",
        "UPDATE extents SET len = {v}",
        "UPDATE extents SET ino = {v}",
        "UPDATE dirents SET ino = {v} WHERE name = (SELECT name FROM dirents ORDER BY random() LIMIT 1)",
        "UPDATE dirents SET parent = {v} WHERE name = (SELECT name FROM dirents ORDER BY random() LIMIT 1)",
        "INSERT OR REPLACE INTO dirents VALUES ({v}, X'41', 1)",
        "UPDATE bitmaps SET bits = {v}",
        "UPDATE bitmaps SET chunk = {v}",
        "UPDATE frozen SET extents = {v}",
        "UPDATE frozen SET kind = {v}",
        "UPDATE frozen SET size = {v}",
        "UPDATE pairs SET state = {v}",
        "UPDATE pairs SET scope_kind = {v}",
        "UPDATE pairs SET scope_ino = {v}",
        "UPDATE super SET value = {v} WHERE key = 'track_size'",
        "UPDATE super SET value = {v} WHERE key = 'volume_size'",
        "UPDATE super SET value = {v} WHERE key = 'next_ino'",
        "UPDATE super SET value = {v} WHERE key = 'uuid'",
        "DELETE FROM inodes WHERE ino = {v}",
        "DELETE FROM super WHERE key = 'clean'",
        "UPDATE xattrs SET name = {v}",
        "DROP TABLE frozen",
    ];
    let cases: u64 = std::env::var("PAIRFS_HOSTILE_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(400);
    let (mut refused, mut accepted) = (0, 0);
    for case in 0..cases {
        let dir = base.path().join(format!("c{case}"));
        std::fs::create_dir(&dir).unwrap();
        let p = Paths::new(&dir.join("v"), None, None);
        for (a, b) in [
            (&good.volume, &p.volume),
            (&good.copy, &p.copy),
            (&good.meta, &p.meta),
        ] {
            std::fs::copy(a, b).unwrap();
        }
        let n = 1 + x.next() % 3;
        let mut applied = Vec::new();
        for _ in 0..n {
            let s = stmts[(x.next() % stmts.len() as u64) as usize];
            let v = values[(x.next() % values.len() as u64) as usize];
            let sql = s.replace("{v}", v);
            exec_sql(&p.meta, &sql);
            applied.push(sql);
        }
        let r = catch_unwind(AssertUnwindSafe(|| walk(&p)));
        match r {
            Ok(Ok(())) => accepted += 1,
            Ok(Err(_)) => refused += 1,
            Err(_) => panic!("case {case}: panic after {applied:?}"),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
    println!(
        "corrupted metadata: {cases} cases, {refused} refused with an error, {accepted} accepted, 0 panics"
    );
    assert!(refused > 0 && accepted > 0);
}

/// Runs SQL on a volume's database through the store's own connection.
fn exec_sql(db: &Path, sql: &str) {
    if let Ok(m) = pairfs::meta::Meta::open(db, false) {
        let _ = m.conn().execute_batch(sql);
    }
}

#[test]
fn truncated_or_scribbled_files_are_refused() {
    let base = tempfile::tempdir().unwrap();
    let good = sample(base.path());
    let meta = std::fs::read(&good.meta).unwrap();
    let img_head = std::fs::read(&good.volume).unwrap()[..4096].to_vec();
    let mut x = X(0xBADC0DE);
    let mut n = 0;
    for case in 0..200u64 {
        let dir = base.path().join(format!("t{case}"));
        std::fs::create_dir(&dir).unwrap();
        let p = Paths::new(&dir.join("v"), None, None);
        std::fs::copy(&good.volume, &p.volume).unwrap();
        std::fs::copy(&good.copy, &p.copy).unwrap();
        let mut m = meta.clone();
        match case % 3 {
            0 => m.truncate((x.next() % meta.len() as u64) as usize),
            1 => {
                for _ in 0..8 {
                    let i = (x.next() % m.len() as u64) as usize;
                    m[i] = x.next() as u8;
                }
            }
            _ => {
                let mut h = img_head.clone();
                let i = (x.next() % 48) as usize;
                h[i] ^= 1 << (x.next() % 8);
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&p.volume)
                    .unwrap();
                std::os::unix::fs::FileExt::write_all_at(&f, &h, 0).unwrap();
            }
        }
        std::fs::write(&p.meta, &m).unwrap();
        let r = catch_unwind(AssertUnwindSafe(|| walk(&p)));
        assert!(r.is_ok(), "case {case}: panic");
        if case % 3 == 2 {
            assert!(
                r.unwrap().is_err(),
                "case {case}: a flipped header bit was accepted"
            );
        }
        n += 1;
        std::fs::remove_dir_all(&dir).unwrap();
    }
    println!("truncated/scribbled files: {n} cases, 0 panics");
}

#[test]
fn xattr_names_and_values() {
    let base = tempfile::tempdir().unwrap();
    let p = Paths::new(&base.path().join("v"), None, None);
    volfile::mkfs(&p, 1 << 20, 4096, false).unwrap();
    let (fs, _l) = volfile::open(&p, Options::default()).unwrap();
    let f = fs
        .create_node(Ctx::default(), ROOT, b"f", libc::S_IFREG | 0o644, 0, None)
        .unwrap()
        .row
        .ino;
    let mut x = X(77);
    let mut ok = 0;
    for _ in 0..3000 {
        let nl = (x.next() % 300) as usize;
        let mut name: Vec<u8> = (0..nl).map(|_| x.next() as u8).collect();
        if x.next().is_multiple_of(2) {
            let mut n = b"user.".to_vec();
            n.extend(name);
            name = n;
        }
        let vl = (x.next() % 70_000) as usize;
        let value: Vec<u8> = (0..vl).map(|_| x.next() as u8).collect();
        let flags = [0, libc::XATTR_CREATE, libc::XATTR_REPLACE, 7][(x.next() % 4) as usize];
        if fs.setxattr(f, &name, &value, flags).is_ok() {
            ok += 1;
            assert_eq!(fs.getxattr(f, &name).unwrap(), value);
        }
        let _ = fs.removexattr(f, &name);
    }
    println!("xattrs: 3000 random names/values, {ok} accepted");
    assert!(ok > 0);
}
