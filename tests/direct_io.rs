//! Files opened with O_DIRECT are answered with `FOPEN_DIRECT_IO |
//! FOPEN_PARALLEL_DIRECT_WRITES`, so their writes reach the daemon concurrently. These
//! tests hold it to what an application expects of O_DIRECT on a local file system:
//! concurrent writes of one file all land; a buffered reader of the same file sees them
//! (the kernel drops its cached pages of the range); a shared mapping of an O_DIRECT
//! file works; a write by a user without CAP_FSETID clears set-user-id; a split in
//! the middle of a stream of direct writes freezes exactly the writes that returned
//! before it; and reads racing punches and truncates (which take the data lock
//! exclusively) never fail and see each byte as written or zero.

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::sync::Arc;

use common::*;

const BS: usize = 4096;

/// A 4 KiB-aligned buffer of `b` (O_DIRECT needs aligned memory).
fn aligned(b: u8, len: usize) -> (Vec<u8>, usize) {
    let mut v = vec![b; len + BS];
    let off = v.as_ptr().align_offset(BS);
    v.truncate(off + len);
    (v, off)
}

fn open_direct(p: &std::path::Path) -> std::fs::File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .custom_flags(libc::O_DIRECT)
        .open(p)
        .unwrap()
}

#[test]
fn concurrent_direct_writes_of_one_file_all_land_and_buffered_readers_see_them() {
    let mut v = Vol::new("1G");
    v.mount();
    let p = v.path("f");
    let blocks = 2048u64; // 8 MiB
    // A buffered reader caches the old contents first.
    std::fs::write(&p, vec![0u8; blocks as usize * BS]).unwrap();
    let reader = std::fs::File::open(&p).unwrap();
    let mut old = vec![0u8; BS];
    reader.read_exact_at(&mut old, 0).unwrap();
    let f = Arc::new(open_direct(&p));
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let f = f.clone();
            std::thread::spawn(move || {
                // Thread t writes every 8th block, each block tagged with its number.
                for b in (t..blocks).step_by(8) {
                    let (buf, off) = aligned((b % 251) as u8 + 1, BS);
                    f.write_all_at(&buf[off..], b * BS as u64).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // The buffered fd (cached pages of the old contents) and a fresh read both see
    // every block.
    for r in [&reader, &std::fs::File::open(&p).unwrap()] {
        let mut got = vec![0u8; blocks as usize * BS];
        r.read_exact_at(&mut got, 0).unwrap();
        for b in 0..blocks as usize {
            let want = (b % 251) as u8 + 1;
            assert!(
                got[b * BS..(b + 1) * BS].iter().all(|&x| x == want),
                "block {b}: expected {want}"
            );
        }
    }
    // A shared mapping of the O_DIRECT file reads and writes through.
    // SAFETY: maps BS bytes of an open file; unmapped below.
    let m = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            BS,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            std::os::unix::io::AsRawFd::as_raw_fd(&*f),
            0,
        )
    };
    assert_ne!(m, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
    // SAFETY: m is a live mapping of BS bytes.
    unsafe {
        assert_eq!(*(m as *const u8), 1);
        *(m as *mut u8) = 0xee;
        assert_eq!(libc::msync(m, BS, libc::MS_SYNC), 0);
        libc::munmap(m, BS);
    }
    let mut first = [0u8; 1];
    std::fs::File::open(&p)
        .unwrap()
        .read_exact_at(&mut first, 0)
        .unwrap();
    assert_eq!(first[0], 0xee, "the mapping's store reached the file");
    drop(reader);
    drop(f);
    v.umount();
    v.fsck();
}

#[test]
fn a_direct_write_by_an_unprivileged_user_clears_set_user_id() {
    let mut v = Vol::new("1G");
    v.mount();
    let p = v.path("suid");
    std::fs::write(&p, vec![0u8; BS]).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o4777)).unwrap();
    std::fs::set_permissions(&v.mnt, std::fs::Permissions::from_mode(0o777)).unwrap();
    // dd as nobody, with O_DIRECT (no CAP_FSETID).
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args(["dd", "if=/dev/zero", "bs=4096", "count=1", "conv=notrunc"])
        .arg("oflag=direct")
        .arg(format!("of={}", p.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mode = std::fs::metadata(&p).unwrap().permissions().mode();
    assert_eq!(mode & 0o7777, 0o777, "mode after the write: {mode:o}");
    v.umount();
}

#[test]
fn a_split_during_direct_writes_freezes_exactly_the_writes_that_returned() {
    let mut v = Vol::new("1G");
    v.mount();
    let p = v.path("d");
    let blocks = 1024u64;
    std::fs::write(&p, vec![0u8; blocks as usize * BS]).unwrap();
    setx(&p, "user.pairfs.pair").unwrap();
    wait_state(&p, "formed");
    let f = Arc::new(open_direct(&p));
    // Four writers each rewrite their own blocks with an increasing round number and
    // record the last round that returned before the split.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done: Arc<Vec<std::sync::atomic::AtomicU64>> = Arc::new(
        (0..blocks)
            .map(|_| std::sync::atomic::AtomicU64::new(0))
            .collect(),
    );
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let (f, stop, done) = (f.clone(), stop.clone(), done.clone());
            std::thread::spawn(move || {
                let mut round = 1u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for b in (t..blocks).step_by(4) {
                        let (buf, off) = aligned(round as u8, BS);
                        f.write_all_at(&buf[off..], b * BS as u64).unwrap();
                        done[b as usize].store(round, std::sync::atomic::Ordering::SeqCst);
                    }
                    round += 1;
                    if round == 250 {
                        break;
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(150));
    let before: Vec<u64> = done
        .iter()
        .map(|d| d.load(std::sync::atomic::Ordering::SeqCst))
        .collect();
    setx(&p, "user.pairfs.split").unwrap();
    let after: Vec<u64> = done
        .iter()
        .map(|d| d.load(std::sync::atomic::Ordering::SeqCst))
        .collect();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    wait_state(&p, "split");
    let mut got = vec![0u8; blocks as usize * BS];
    std::fs::File::open(v.copy_path("d"))
        .unwrap()
        .read_exact_at(&mut got, 0)
        .unwrap();
    for b in 0..blocks as usize {
        let r = u64::from(got[b * BS]);
        assert!(
            got[b * BS..(b + 1) * BS].iter().all(|&x| u64::from(x) == r),
            "block {b} of the frozen copy is torn"
        );
        // A write that returned before the split call began is in the copy; one that
        // began after the split returned is not.
        assert!(
            r >= before[b] && r <= after[b] + 1,
            "block {b}: frozen round {r}, returned before the split {}, after it {}",
            before[b],
            after[b]
        );
    }
    drop(f);
    v.umount();
    v.fsck();
}

/// Reads take the file's data lock without waiting under the namespace lock
/// (`Fs::read_into`: `try_read`, else drop the namespace lock, wait, and take it again).
/// Direct and buffered readers race punches, truncates and rewrites, which take the data
/// lock exclusively: no read fails, and every byte read is the block's pattern or zero.
#[test]
fn reads_racing_truncate_and_punch_see_the_pattern_or_zeros() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut v = Vol::new("1G");
    v.mount();
    let p = v.path("f");
    let blocks = 1024u64; // 4 MiB
    let pat = |b: u64| (b % 251) as u8 + 1;
    let whole: Vec<u8> = (0..blocks)
        .flat_map(|b| std::iter::repeat_n(pat(b), BS))
        .collect();
    std::fs::write(&p, &whole).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..4u64)
        .map(|t| {
            let (p, stop) = (p.clone(), stop.clone());
            std::thread::spawn(move || {
                let f = if t % 2 == 0 {
                    OpenOptions::new()
                        .read(true)
                        .custom_flags(libc::O_DIRECT)
                        .open(&p)
                        .unwrap()
                } else {
                    std::fs::File::open(&p).unwrap()
                };
                let (mut buf, off) = aligned(0, BS);
                let mut b = t * 97;
                let mut n_reads = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    b = (b * 1103515245 + 12345) % blocks;
                    let n = f
                        .read_at(&mut buf[off..off + BS], b * BS as u64)
                        .expect("read");
                    let got = &buf[off..off + n];
                    assert!(
                        got.iter().all(|&x| x == pat(b) || x == 0),
                        "block {b}: a byte neither its pattern nor zero"
                    );
                    n_reads += 1;
                }
                n_reads
            })
        })
        .collect();
    let f = OpenOptions::new().write(true).open(&p).unwrap();
    for round in 0..200u64 {
        let b = (round * 37) % (blocks - 16);
        let (o, l) = (b * BS as u64, 16 * BS as u64);
        // SAFETY: fallocate on an open file with plain integer arguments.
        let r = unsafe {
            libc::fallocate(
                std::os::fd::AsRawFd::as_raw_fd(&f),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                o as libc::off_t,
                l as libc::off_t,
            )
        };
        assert_eq!(r, 0, "punch: {}", std::io::Error::last_os_error());
        f.write_all_at(&whole[o as usize..(o + l) as usize], o)
            .unwrap();
        if round % 10 == 0 {
            f.set_len(blocks * BS as u64 / 2).unwrap();
            f.set_len(blocks * BS as u64).unwrap();
            let h = blocks as usize * BS / 2;
            f.write_all_at(&whole[h..], h as u64).unwrap();
        }
    }
    stop.store(true, Ordering::Relaxed);
    let reads: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
    assert!(reads > 0);
    same("after the races", &read_all(&p), &whole);
}
