//! `pairfs diff` through a real mount: after random writes into a split file (and an
//! append), the listed ranges cover every byte that differs from the copy mount's file
//! and, rounded to tracks, nothing else; after an update the diff is empty; a directory
//! lists its files; an unknown generation is refused.

mod common;

use std::os::unix::fs::FileExt;

use common::*;

const TS: u64 = 64 * 1024;

fn diff_json(p: &std::path::Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["diff", p.to_str().unwrap(), "--json"];
    args.extend_from_slice(extra);
    let out = pairfs(&args);
    assert!(
        out.status.success(),
        "diff: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn ranges(v: &serde_json::Value) -> Vec<(u64, u64)> {
    v["ranges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r[0].as_u64().unwrap(), r[1].as_u64().unwrap()))
        .collect()
}

#[test]
fn diff_lists_exactly_the_changed_tracks() {
    let mut v = Vol::new("1G");
    v.mount();
    let d = v.path("d");
    std::fs::create_dir(&d).unwrap();
    let path = v.path("d/big");
    let size: u64 = 64 << 20;
    {
        let f = std::fs::File::create(&path).unwrap();
        for i in 0..size / (1 << 20) {
            f.write_all_at(&block(i, 0, 1 << 20), i << 20).unwrap();
        }
        std::fs::write(v.path("d/small"), b"hello").unwrap();
    }
    let out = pairfs(&["split", d.to_str().unwrap(), "--wait"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Nothing changed yet.
    assert!(ranges(&diff_json(&path, &[])).is_empty());

    // Random writes of random sizes, some across track boundaries, and an append.
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rnd = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..200 {
        let off = rnd() % size;
        let len = (1 + rnd() % 20_000).min(size - off);
        f.write_all_at(&block(1000 + i, 1, len as usize), off)
            .unwrap();
    }
    let new_size = size + 100_000;
    f.write_all_at(&block(7, 7, 100_000), size).unwrap();
    drop(f);

    let j = diff_json(&path, &[]);
    assert_eq!(j["size"].as_u64(), Some(new_size));
    assert_eq!(j["old_size"].as_u64(), Some(size));
    assert_eq!(j["track_size"].as_u64(), Some(TS));
    let r = ranges(&j);
    // Sorted, merged, inside the file.
    for w in r.windows(2) {
        assert!(w[0].0 + w[0].1 < w[1].0, "not merged: {w:?}");
    }
    assert!(r.iter().all(|&(o, l)| l > 0 && o + l <= new_size));

    let live = std::fs::read(&path).unwrap();
    let copy = std::fs::read(v.copy_path("d/big")).unwrap();
    assert_eq!(copy.len() as u64, size);
    let changed = |i: usize| i >= copy.len() || live[i] != copy[i];
    let listed = |i: u64| r.iter().any(|&(o, l)| o <= i && i < o + l);
    // Every changed byte is listed.
    for i in 0..live.len() {
        if changed(i) {
            assert!(listed(i as u64), "byte {i} changed but not listed");
        }
    }
    // Every listed track holds a changed byte (rounded to tracks, nothing else).
    let mut tracks: Vec<u64> = r
        .iter()
        .flat_map(|&(o, l)| o / TS..(o + l).div_ceil(TS))
        .collect();
    tracks.dedup();
    for t in &tracks {
        let a = (t * TS) as usize;
        let b = (((t + 1) * TS) as usize).min(live.len());
        assert!(
            (a..b).any(changed),
            "track {t} listed but no byte of it changed"
        );
    }
    // And ranges are whole tracks except at the end of the file.
    for &(o, l) in &r {
        assert_eq!(o % TS, 0);
        assert!((o + l) % TS == 0 || o + l == new_size);
    }

    // The text form: a header, then the same ranges.
    let out = pairfs(&["diff", path.to_str().unwrap()]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    assert!(
        lines
            .next()
            .unwrap()
            .starts_with(&format!("# size={new_size} old_size={size}"))
    );
    let tr: Vec<(u64, u64)> = lines
        .map(|l| {
            let (a, b) = l.split_once(' ').unwrap();
            (a.parse().unwrap(), b.parse().unwrap())
        })
        .collect();
    assert_eq!(tr, r);

    // A directory: one entry per regular file; the untouched one has no range.
    let dj = diff_json(&d, &[]);
    let files = dj.as_array().unwrap();
    assert_eq!(files.len(), 2);
    assert_eq!(files[0]["path"], "big");
    assert_eq!(ranges(&files[0]), r);
    assert_eq!(files[1]["path"], "small");
    assert!(ranges(&files[1]).is_empty());

    // Generations: only the default exists.
    assert!(ranges(&diff_json(&path, &["--generation", "default"])) == r);
    let out = pairfs(&["diff", path.to_str().unwrap(), "--generation", "hourly"]);
    assert_eq!(out.status.code(), Some(libc::ENOENT));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such generation"));

    // Shrink: the ranges stop at the new size.
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(3 * TS + 5).unwrap();
    drop(f);
    let j = diff_json(&path, &[]);
    assert_eq!(j["size"].as_u64(), Some(3 * TS + 5));
    assert!(ranges(&j).iter().all(|&(o, l)| o + l <= 3 * TS + 5));

    // After an update the frozen copy is the file as it is: nothing changed.
    let out = pairfs(&["update", d.to_str().unwrap(), "--wait"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(ranges(&diff_json(&path, &[])).is_empty());
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .write_all_at(b"x", TS + 1)
        .unwrap();
    assert_eq!(ranges(&diff_json(&path, &[])), vec![(TS, TS)]);

    // A file with no frozen copy: refused with EINVAL's message.
    std::fs::write(v.path("loose"), b"x").unwrap();
    let out = pairfs(&["diff", v.path("loose").to_str().unwrap()]);
    assert!(!out.status.success());
    v.umount();
}

/// The diff in each pair state, through the core (the copier runs only when told): the
/// record bitmap of the current instant decides, a running copy changes nothing, and an
/// update starts a new instant.
#[test]
fn diff_follows_the_instant_not_the_copy() {
    use pairfs::core::fs::{Ctx, Options, ROOT};
    use pairfs::core::volfile::{self, Paths};
    use pairfs::snap::engine::Op;
    let dir = tempfile::tempdir().unwrap();
    let p = Paths::new(&dir.path().join("v"), None, None);
    let ts = 4096u64;
    volfile::mkfs(&p, 8 << 20, ts, false).unwrap();
    let (fs, _lock) = volfile::open(&p, Options::default()).unwrap();
    let f = fs
        .create_node(Ctx::default(), ROOT, b"f", libc::S_IFREG | 0o644, 0, None)
        .unwrap()
        .row
        .ino;
    fs.write(f, 0, &vec![1u8; (16 * ts) as usize]).unwrap();
    let copy_all = || {
        let mut c = std::collections::BTreeMap::new();
        while fs.engine.copy_round(&fs, &mut c) > 0 {}
    };
    let state = || fs.engine.status_of(&fs, f).unwrap().unwrap().state;
    // No frozen copy yet: refused.
    fs.control(f, Op::Pair).unwrap();
    assert_eq!(fs.diff(f, None).unwrap_err().errno(), libc::EINVAL);
    fs.control(f, Op::Split).unwrap();
    assert_eq!(state(), "splitting");
    assert!(fs.diff(f, None).unwrap().ranges.is_empty());
    fs.write(f, 3 * ts + 10, b"x").unwrap();
    let d = fs.diff(f, None).unwrap();
    assert_eq!(
        (d.state.as_str(), d.ranges.clone()),
        ("splitting", vec![(3 * ts, ts)])
    );
    // The copier finishing the split's copy changes nothing.
    copy_all();
    assert_eq!(state(), "split");
    assert_eq!(fs.diff(f, None).unwrap().ranges, vec![(3 * ts, ts)]);
    // Update: a new instant; while its copy runs (updating) the diff is against it.
    fs.control(f, Op::Update).unwrap();
    assert_eq!(state(), "updating");
    assert!(fs.diff(f, None).unwrap().ranges.is_empty());
    fs.write(f, 9 * ts, b"y").unwrap();
    fs.write(f, 20 * ts, b"z").unwrap(); // grows the file: the new bytes too
    let want = vec![(9 * ts, ts), (16 * ts, 4 * ts + 1)];
    assert_eq!(fs.diff(f, None).unwrap().ranges, want);
    copy_all();
    assert_eq!(state(), "split");
    assert_eq!(
        fs.diff(f, None).unwrap().ranges,
        want,
        "update-diff became split-diff"
    );
    // Punched tracks read zeros now: changed.
    fs.fallocate(
        f,
        12 * ts,
        ts,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
    )
    .unwrap();
    assert_eq!(
        fs.diff(f, None).unwrap().ranges,
        vec![(9 * ts, ts), (12 * ts, ts), (16 * ts, 4 * ts + 1)]
    );
    // Resync drops the frozen copy: refused again.
    fs.control(f, Op::Resync).unwrap();
    assert_eq!(fs.diff(f, None).unwrap_err().errno(), libc::EINVAL);
    fs.shutdown().unwrap();
}
