//! Kernel write-back caching (`-o writeback_cache`): a `write()` that returned before a
//! split or update is in the frozen copy even though the kernel still held it in its page
//! cache when the request arrived (SPEC "Kernel caches"): the daemon has the kernel write
//! the scope's dirty pages back before it takes the instant. The writes here are small
//! and the split follows at once, well inside the kernel's 30 s dirty expiry, so without
//! that flush the copy would hold the older bytes.

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;

use common::*;

fn fill(b: u8, n: usize) -> Vec<u8> {
    vec![b; n]
}

#[test]
fn writes_held_in_the_page_cache_belong_to_the_split_instant() {
    let mut v = Vol::new("1G");
    v.mount_opts("writeback_cache");
    let n = 256 * 1024;
    for scope in ["file", "dir"] {
        std::fs::create_dir(v.path(scope)).unwrap();
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(v.path(&format!("{scope}/f")))
            .unwrap();
        f.write_all_at(&fill(b'A', n), 0).unwrap();
        f.sync_all().unwrap();
        let target = if scope == "file" {
            v.path("file/f")
        } else {
            v.path("dir")
        };
        setx(&target, "user.pairfs.split").unwrap();
        wait_state(&target, "split");
        // Not synced: still in the kernel's page cache when the update arrives.
        f.write_all_at(&fill(b'B', n), 0).unwrap();
        if scope == "dir" {
            std::fs::write(v.path("dir/new"), fill(b'N', 5000)).unwrap();
        }
        setx(&target, "user.pairfs.update").unwrap();
        // After the instant: not in this copy.
        f.write_all_at(&fill(b'C', n / 2), 0).unwrap();
        wait_state(&target, "split");
        let copy = std::fs::read(v.copy_path(&format!("{scope}/f"))).unwrap();
        assert_eq!(copy.len(), n, "{scope}: frozen size");
        assert!(
            copy.iter().all(|&b| b == b'B'),
            "{scope}: the frozen copy lacks writes that returned before the update"
        );
        if scope == "dir" {
            assert_eq!(
                std::fs::read(v.copy_path("dir/new")).unwrap(),
                fill(b'N', 5000)
            );
        }
        // The live file has the later write on top.
        let mut live = vec![0u8; n];
        f.read_exact_at(&mut live, 0).unwrap();
        assert!(live[..n / 2].iter().all(|&b| b == b'C'));
        assert!(live[n / 2..].iter().all(|&b| b == b'B'));
    }
    v.umount();
    v.fsck();
}
