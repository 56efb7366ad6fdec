//! Staged copy-on-write through a real mount: 4 KiB writes into a file whose split copy
//! is still running are acknowledged without waiting for the copy (they are staged in
//! memory), read back at once, survive fsync and a remount, and never reach the frozen
//! copy, which keeps the split-time content.
//!
//! cargo test --release --test staged

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;

use common::*;

const MIB: usize = 1 << 20;

#[test]
fn writes_during_a_split_copy_are_staged_and_the_frozen_copy_keeps_the_instant() {
    let mut v = Vol::new("2G");
    v.mount();
    let f = v.path("big");
    let size = 192 * MIB;
    let mut before = Vec::with_capacity(size);
    {
        let mut w = std::fs::File::create(&f).unwrap();
        for i in 0..(size / 65536) as u64 {
            let b = block(i, 0, 65536);
            w.write_all(&b).unwrap();
            before.extend_from_slice(&b);
        }
        w.sync_all().unwrap();
    }
    let mut model = before.clone();
    setx(&f, "user.pairfs.split").unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&f)
        .unwrap();
    let mut x: u64 = 0x1234_5678_9abc_def1;
    let mut staged_seen = 0;
    for k in 0..3000u64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = (x % (size as u64 / 4096)) * 4096 + (x >> 40) % 3000;
        let len = 1 + ((x >> 20) % 6000) as usize;
        let len = len.min(size - off as usize);
        let data = block(1_000_000 + k, 1, len);
        file.write_all_at(&data, off).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&data);
        if k % 500 == 499 {
            // Read-your-writes, staged or not: check a window around the last write.
            let a = (off as usize).saturating_sub(70_000);
            let b = (off as usize + len + 70_000).min(size);
            let mut buf = vec![0u8; b - a];
            file.read_exact_at(&mut buf, a as u64).unwrap();
            assert!(buf == model[a..b], "read after write {k} differs");
        }
    }
    let s = state(&f);
    staged_seen += field(&s, "staged_tracks").unwrap_or(0);
    // The whole live file reads what was written (staged tracks laid over the volume).
    let mut live = Vec::new();
    std::fs::File::open(&f)
        .unwrap()
        .read_to_end(&mut live)
        .unwrap();
    assert!(live == model, "live content differs from what was written");
    file.sync_all().unwrap();
    drop(file);
    wait_state(&f, "split");
    // The frozen copy is the split instant, whatever was staged meanwhile.
    let mut frozen = Vec::new();
    std::fs::File::open(v.copy_path("big"))
        .unwrap()
        .read_to_end(&mut frozen)
        .unwrap();
    assert!(frozen == before, "the frozen copy changed");
    assert!(
        staged_seen > 0,
        "no write was staged (the copy finished before the writes?): {s}"
    );
    // fsync'd data survives an unmount and a mount.
    v.umount();
    v.fsck();
    v.mount();
    let mut after = Vec::new();
    let mut r = std::fs::File::open(&f).unwrap();
    r.seek(SeekFrom::Start(0)).unwrap();
    r.read_to_end(&mut after).unwrap();
    drop(r);
    assert!(after == model, "content after remount differs");
    let mut frozen2 = Vec::new();
    std::fs::File::open(v.copy_path("big"))
        .unwrap()
        .read_to_end(&mut frozen2)
        .unwrap();
    assert!(
        frozen2 == before,
        "the frozen copy changed across the remount"
    );
    println!("staged copy-on-write test: {staged_seen} tracks staged");
    v.umount();
}
