//! Many threads at once through a real mount: writers rewriting whole files, a thread
//! splitting and updating their directory, readers of the copy mount. Every frozen file
//! must be of one instant: each write covers a whole file with one generation number,
//! so a frozen copy holding two generations would be a torn split.

mod common;

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;

const FILE: usize = 256 * 1024; // 4 tracks: every write spans several tracks
const FILES: usize = 4;

fn content(file: usize, generation: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(FILE);
    while v.len() < FILE {
        v.extend_from_slice(&generation.to_le_bytes());
        v.extend_from_slice(&(file as u64).to_le_bytes());
    }
    v
}

fn generations(buf: &[u8]) -> Vec<u64> {
    let mut g: Vec<u64> = buf
        .chunks_exact(16)
        .map(|c| u64::from_le_bytes(c[..8].try_into().unwrap()))
        .collect();
    g.sort_unstable();
    g.dedup();
    g
}

#[test]
fn writers_splitters_and_copy_readers_at_once() {
    let mut v = Vol::new("1G");
    v.mount();
    let dir = v.path("d");
    std::fs::create_dir(&dir).unwrap();
    for k in 0..FILES {
        std::fs::write(dir.join(format!("f{k}")), content(k, 0)).unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let reads = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for k in 0..FILES {
        let (stop, writes, dir) = (stop.clone(), writes.clone(), dir.clone());
        threads.push(std::thread::spawn(move || {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join(format!("f{k}")))
                .unwrap();
            let mut g = 0;
            while !stop.load(Ordering::Relaxed) {
                g += 1;
                f.write_all_at(&content(k, g), 0).unwrap();
                writes.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for _ in 0..2 {
        let (stop, reads, copy, dir) = (stop.clone(), reads.clone(), v.copy_path("d"), dir.clone());
        threads.push(std::thread::spawn(move || {
            // The split instant, read before and after each file: an update between the
            // two legitimately changes the copy under the reader.
            let instant = |d: &std::path::Path| {
                let s = state(d);
                s.split(' ')
                    .find(|kv| kv.starts_with("split_time="))
                    .map(str::to_string)
            };
            while !stop.load(Ordering::Relaxed) {
                for k in 0..FILES {
                    let t0 = instant(&dir);
                    // The copy may be between instants (resync) or not there yet.
                    let Ok(b) = std::fs::read(copy.join(format!("f{k}"))) else {
                        continue;
                    };
                    if b.len() != FILE || t0.is_none() || instant(&dir) != t0 {
                        continue;
                    }
                    let g = generations(&b);
                    assert_eq!(g.len(), 1, "frozen f{k} mixes generations {g:?}");
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(6);
    let mut ops = 0;
    let mut rounds = 0;
    while Instant::now() < deadline {
        let op = [
            "user.pairfs.split",
            "user.pairfs.update",
            "user.pairfs.update",
            "user.pairfs.resync",
        ][rounds % 4];
        rounds += 1;
        match setx(&dir, op) {
            Ok(()) => ops += 1,
            Err(e) => assert!(
                matches!(e.raw_os_error(), Some(libc::EBUSY) | Some(libc::EINVAL)),
                "{op}: {e}"
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("a thread failed");
    }
    // A final split under no writes equals the files.
    let _ = setx(&dir, "user.pairfs.split");
    let _ = setx(&dir, "user.pairfs.update");
    let s = wait_state(&dir, "split");
    for k in 0..FILES {
        let a = std::fs::read(dir.join(format!("f{k}"))).unwrap();
        let b = std::fs::read(v.copy_path(&format!("d/f{k}"))).unwrap();
        assert!(a == b, "f{k}: copy differs after a quiet update ({s})");
    }
    println!(
        "concurrency: {} writes, {} copy reads, {ops} pair operations",
        writes.load(Ordering::Relaxed),
        reads.load(Ordering::Relaxed)
    );
    assert!(reads.load(Ordering::Relaxed) > 0 && ops > 2);
    v.umount();
    v.fsck();
}
