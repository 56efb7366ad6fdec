//! I/O faults on either image: the caller gets EIO (or ENOSPC), nothing is silently
//! dropped, a failed sync poisons the handle, a pair whose copy fails goes to `error`
//! while the original keeps working, and update or resync recovers once the fault clears.

use std::sync::Arc;

use pairfs::core::fs::{Ctx, Fs, Options, ROOT};
use pairfs::meta::{Geometry, Meta};
use pairfs::snap::engine::Op;
use pairfs::store::volume::{FaultVolume, Faults, MemVolume};

const TS: u64 = 4096;

struct Rig {
    _dir: tempfile::TempDir,
    fs: Fs,
    vol: Arc<FaultVolume<MemVolume>>,
    copy: Arc<FaultVolume<MemVolume>>,
}

fn rig(tracks: u64) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let g = Geometry {
        uuid: "0123456789abcdef0123456789abcdef".into(),
        size: tracks * TS,
        track_size: TS,
    };
    let meta = Meta::create(&dir.path().join("m"), &g, 0).unwrap();
    let loaded = meta.load().unwrap();
    let vol = Arc::new(FaultVolume::new(MemVolume::new((tracks * TS) as usize)));
    let copy = Arc::new(FaultVolume::new(MemVolume::new((tracks * TS) as usize)));
    let fs = Fs::new(
        meta,
        loaded,
        Box::new(vol.clone()),
        Box::new(copy.clone()),
        Options::default(),
    )
    .unwrap();
    Rig {
        _dir: dir,
        fs,
        vol,
        copy,
    }
}

fn file(fs: &Fs, name: &str) -> u64 {
    fs.create_node(
        Ctx::default(),
        ROOT,
        name.as_bytes(),
        libc::S_IFREG | 0o644,
        0,
        None,
    )
    .unwrap()
    .row
    .ino
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

fn state(fs: &Fs, ino: u64) -> String {
    fs.engine
        .status_of(fs, ino)
        .unwrap()
        .map(|s| s.line())
        .unwrap_or_default()
}

#[test]
fn copy_image_failure_puts_the_pair_in_error_and_update_recovers() {
    let r = rig(256);
    let ino = file(&r.fs, "db");
    r.fs.write(ino, 0, &vec![1u8; 8 * TS as usize]).unwrap();
    r.fs.control(ino, Op::Split).unwrap();
    // The copy image fails: the copy-on-write of the next write cannot be made.
    r.copy.set_faults(Faults {
        write: true,
        ..Faults::default()
    });
    r.fs.write(ino, 0, &vec![2u8; TS as usize])
        .expect("the original keeps working");
    // The write was staged; the destage round copies the old track and that fails.
    r.fs.engine
        .destage(&r.fs)
        .expect("the staged data still reaches the volume");
    assert!(
        state(&r.fs, ino).starts_with("error"),
        "{}",
        state(&r.fs, ino)
    );
    assert!(
        state(&r.fs, ino).contains("update or resync"),
        "the error says what to do"
    );
    assert!(
        frozen(&r.fs, ino).is_none(),
        "an untrustworthy frozen copy is withdrawn"
    );
    assert_eq!(r.fs.read(ino, 0, 1).unwrap(), vec![2u8]);
    assert!(r.copy.injected() > 0);
    // Fault cleared: update recovers; the copy is the file as of the update.
    r.copy.set_faults(Faults::default());
    r.fs.control(ino, Op::Update).unwrap();
    r.fs.write(ino, TS, &vec![3u8; TS as usize]).unwrap();
    let mut c = std::collections::BTreeMap::new();
    while r.fs.engine.copy_round(&r.fs, &mut c) > 0 {}
    assert!(
        state(&r.fs, ino).starts_with("split"),
        "{}",
        state(&r.fs, ino)
    );
    let f = frozen(&r.fs, ino).unwrap();
    assert_eq!(&f[..TS as usize], &vec![2u8; TS as usize][..]);
    assert_eq!(
        &f[TS as usize..2 * TS as usize],
        &vec![1u8; TS as usize][..]
    );
}

#[test]
fn a_full_copy_image_fails_the_pair_not_the_host() {
    let r = rig(256);
    let ino = file(&r.fs, "f");
    r.fs.write(ino, 0, &vec![5u8; 16 * TS as usize]).unwrap();
    r.copy.set_faults(Faults {
        full: true,
        ..Faults::default()
    });
    r.fs.control(ino, Op::Split).unwrap();
    let mut c = std::collections::BTreeMap::new();
    r.fs.engine.copy_round(&r.fs, &mut c);
    assert!(
        state(&r.fs, ino).starts_with("error"),
        "{}",
        state(&r.fs, ino)
    );
    r.fs.write(ino, 0, b"still writable").unwrap();
    r.copy.set_faults(Faults::default());
    r.fs.control(ino, Op::Resync).unwrap();
    while r.fs.engine.copy_round(&r.fs, &mut c) > 0 {}
    assert!(
        state(&r.fs, ino).starts_with("formed"),
        "{}",
        state(&r.fs, ino)
    );
}

#[test]
fn failed_volume_sync_poisons_and_fails_fsync() {
    let r = rig(64);
    let ino = file(&r.fs, "f");
    r.fs.write(ino, 0, b"hello").unwrap();
    r.vol.set_faults(Faults {
        sync: true,
        ..Faults::default()
    });
    let e = r.fs.commit(Vec::new()).unwrap_err();
    assert_eq!(e.errno(), libc::EIO);
    r.vol.set_faults(Faults::default());
    // The fault is gone, but nothing written after a failed sync can be trusted durable.
    assert_eq!(r.fs.write(ino, 0, b"x").unwrap_err().errno(), libc::EIO);
    assert_eq!(r.fs.commit(Vec::new()).unwrap_err().errno(), libc::EIO);
    // Reads still work.
    assert_eq!(r.fs.read(ino, 0, 5).unwrap(), b"hello");
}

#[test]
fn read_and_write_errors_reach_the_caller() {
    let r = rig(64);
    let ino = file(&r.fs, "f");
    r.fs.write(ino, 0, &vec![1u8; TS as usize]).unwrap();
    r.vol.set_faults(Faults {
        read: true,
        ..Faults::default()
    });
    assert_eq!(r.fs.read(ino, 0, 10).unwrap_err().errno(), libc::EIO);
    r.vol.set_faults(Faults {
        write: true,
        ..Faults::default()
    });
    assert_eq!(r.fs.write(ino, 0, b"y").unwrap_err().errno(), libc::EIO);
}

#[test]
fn a_full_volume_returns_enospc_and_keeps_what_was_written() {
    let r = rig(32);
    let a = file(&r.fs, "a");
    let data = vec![9u8; 20 * TS as usize];
    r.fs.write(a, 0, &data).unwrap();
    let b = file(&r.fs, "b");
    let e = r.fs.write(b, 0, &vec![1u8; 20 * TS as usize]).unwrap_err();
    assert_eq!(e.errno(), libc::ENOSPC);
    assert_eq!(r.fs.read(a, 0, data.len() as u32).unwrap(), data);
    // Space that fits still works.
    r.fs.write(b, 0, &vec![1u8; 4 * TS as usize]).unwrap();
    assert_eq!(r.fs.statfs().free, 32 - 1 - 20 - 4);
}

#[test]
fn pinned_space_is_counted_and_freed_by_release() {
    let r = rig(64);
    let ino = file(&r.fs, "f");
    r.fs.write(ino, 0, &vec![1u8; 10 * TS as usize]).unwrap();
    r.fs.control(ino, Op::Split).unwrap();
    r.fs.truncate(ino, 0).unwrap();
    r.fs.commit(Vec::new()).unwrap();
    let free_pinned = r.fs.statfs().free;
    assert_eq!(
        free_pinned,
        64 - 1 - 10,
        "frozen tracks stay in use after the file shrinks"
    );
    assert!(state(&r.fs, ino).contains(&format!("pinned_bytes={}", 10 * TS)));
    assert_eq!(frozen(&r.fs, ino).unwrap(), vec![1u8; 10 * TS as usize]);
    r.fs.control(ino, Op::Release).unwrap();
    assert_eq!(r.fs.statfs().free, 64 - 1);
}

#[test]
fn a_file_with_its_own_pair_moved_into_a_paired_directory_keeps_its_pair() {
    let r = rig(256);
    let c = Ctx::default();
    let d =
        r.fs.create_node(c, ROOT, b"d", libc::S_IFDIR | 0o755, 0, None)
            .unwrap()
            .row
            .ino;
    let g =
        r.fs.create_node(c, d, b"g", libc::S_IFREG | 0o644, 0, None)
            .unwrap()
            .row
            .ino;
    r.fs.write(g, 0, &vec![4u8; 2 * TS as usize]).unwrap();
    let f = file(&r.fs, "f");
    r.fs.write(f, 0, &vec![7u8; 3 * TS as usize]).unwrap();
    r.fs.control(f, Op::Split).unwrap();
    r.fs.control(d, Op::Pair).unwrap();
    r.fs.rename(ROOT, b"f", d, b"f", 0).unwrap();
    r.fs.control(d, Op::Split).unwrap();
    let frozen_d: Vec<u64> =
        r.fs.engine
            .frozen_objects(&r.fs)
            .iter()
            .filter(|o| o.2.path.starts_with('d'))
            .map(|o| o.2.ino)
            .collect();
    assert!(
        frozen_d.contains(&g) && !frozen_d.contains(&f),
        "{frozen_d:?}"
    );
    // Everything copied; then releasing the directory pair must not unpin or wipe the
    // file's own frozen copy.
    let mut cur = std::collections::BTreeMap::new();
    while r.fs.engine.copy_round(&r.fs, &mut cur) > 0 {}
    r.fs.control(d, Op::Release).unwrap();
    r.fs.write(f, 0, &vec![8u8; 3 * TS as usize]).unwrap();
    let x = file(&r.fs, "x");
    r.fs.write(x, 0, &vec![9u8; 200 * TS as usize]).unwrap();
    while r.fs.engine.copy_round(&r.fs, &mut cur) > 0 {}
    assert_eq!(frozen(&r.fs, f).unwrap(), vec![7u8; 3 * TS as usize]);
}
