//! Seed 004, third embodiment, through a real mount: a file of a paired directory split
//! on its own (`user.pairfs.split` on the file), updated alone, joined back into the
//! group pair (`user.pairfs.join`), split off again and released. At every step both
//! frozen copies are checked byte for byte: the group's (`COPY/d/f`, the directory's
//! instant) and the file's own (always at `COPY/.pairfs/ID/d/f`; at `COPY/d/f` too when the
//! group's frozen copy does not hold the file). Remounts, a kill -9 and `pairfs fsck` in
//! between (kill -9 rounds under a writer: `tests/group_kill.rs`).

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;

use common::*;

const KIB: usize = 1024;

/// True once `p` is gone from the copy mount. The copy mount drops the kernel's cached
/// names after a change of the frozen set from its own thread (their TTL is 1 s), so a
/// name may outlive the operation that removed it by a moment.
fn gone(p: &Path) -> bool {
    let t = std::time::Instant::now();
    while p.exists() {
        if t.elapsed() > std::time::Duration::from_secs(3) {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    true
}

fn scope(p: &Path) -> String {
    state(p)
        .split(' ')
        .find_map(|kv| kv.strip_prefix("scope=").map(str::to_string))
        .unwrap()
}

#[test]
fn a_file_split_on_its_own_inside_a_group_keeps_both_frozen_copies() {
    let mut v = Vol::new("256M");
    v.mount();
    let (d, f, g) = (v.path("d"), v.path("d/f"), v.path("d/g"));
    std::fs::create_dir(&d).unwrap();
    make(&f, 48, 0);
    make(&g, 8, 0);
    ctl(&d, "pair");
    wait_state(&d, "formed");
    put(&f, 3, 1, 64 * KIB);

    // The group's instant.
    ctl(&d, "split");
    let dir_id = pair_id(&d);
    let f_group = read_all(&f);
    let g_group = read_all(&g);
    put(&f, 3, 2, 64 * KIB);
    put(&f, 10, 2, 5 * KIB);
    put(&g, 1, 2, 64 * KIB);
    same("group copy of f", &read_all(&v.copy_path("d/f")), &f_group);

    // A file pair inside a pair that is not a file can only come from a split or pair.
    assert!(setx(&f, "user.pairfs.update").is_err());
    assert!(setx(&f, "user.pairfs.join").is_err());

    // f split on its own: its own instant, the group's copy of f unchanged.
    ctl(&f, "split");
    let own_id = pair_id(&f);
    assert_ne!(own_id, dir_id);
    assert_eq!(scope(&f), "file");
    assert_eq!(pair_id(&d), dir_id);
    let f_own = read_all(&f);
    let own = |v: &Vol| v.copy_path(&format!(".pairfs/{own_id}/d/f"));
    let check = |v: &Vol, step: &str, own_want: &[u8]| {
        same(
            &format!("{step}: group copy of f"),
            &read_all(&v.copy_path("d/f")),
            &f_group,
        );
        same(
            &format!("{step}: group copy of g"),
            &read_all(&v.copy_path("d/g")),
            &g_group,
        );
        same(
            &format!("{step}: f's own copy"),
            &read_all(&own(v)),
            own_want,
        );
    };
    check(&v, "after the split of f", &f_own);
    // Overwrite the tracks both copies hold, extend, shrink a little.
    for b in [0, 3, 10, 47] {
        put(&f, b, 3, 64 * KIB);
    }
    put(&f, 60, 3, 7 * KIB);
    put(&g, 2, 3, 64 * KIB);
    check(&v, "after writes", &f_own);
    wait_state(&f, "split");
    wait_state(&d, "split");
    check(&v, "copied", &f_own);

    v.umount();
    v.fsck();
    v.mount();
    check(&v, "after a remount", &f_own);

    // Update of f alone: its copy moves to now, the group's stays.
    ctl(&f, "update");
    let f_own2 = read_all(&f);
    put(&f, 5, 4, 64 * KIB);
    check(&v, "after the update of f", &f_own2);
    wait_state(&f, "split");
    check(&v, "update copied", &f_own2);
    assert!(v.copy_path("d/f").exists());

    // A kill -9 with both copies in place, then fsck and remount.
    put(&f, 6, 5, 64 * KIB);
    v.kill9();
    v.fsck();
    v.mount();
    check(&v, "after a kill -9", &f_own2);
    assert_eq!(pair_id(&f), own_id);

    // Join: f's own pair ends, the group's frozen copy of f stays as it was.
    ctl(&f, "join");
    assert_eq!(pair_id(&f), dir_id);
    assert!(gone(&own(&v)), "f's own copy is gone after join");
    same(
        "group copy of f after join",
        &read_all(&v.copy_path("d/f")),
        &f_group,
    );
    put(&f, 7, 6, 64 * KIB);
    same(
        "group copy of f after a write",
        &read_all(&v.copy_path("d/f")),
        &f_group,
    );

    // The group's next update covers f again.
    ctl(&d, "update");
    let f_group2 = read_all(&f);
    let g_group2 = read_all(&g);
    put(&f, 7, 7, 64 * KIB);
    wait_state(&d, "split");
    same(
        "group copy of f after the group update",
        &read_all(&v.copy_path("d/f")),
        &f_group2,
    );
    same(
        "group copy of g after the group update",
        &read_all(&v.copy_path("d/g")),
        &g_group2,
    );

    // Split off again, write, remount, then release f's pair: the group's copy stays.
    ctl(&f, "split");
    let own2 = pair_id(&f);
    assert_ne!(own2, dir_id);
    let f_own3 = read_all(&f);
    put(&f, 7, 8, 64 * KIB);
    put(&f, 20, 8, 64 * KIB);
    let own2_path = v.copy_path(&format!(".pairfs/{own2}/d/f"));
    same("f's second own copy", &read_all(&own2_path), &f_own3);
    same(
        "group copy of f beside the second own copy",
        &read_all(&v.copy_path("d/f")),
        &f_group2,
    );
    v.umount();
    v.fsck();
    v.mount();
    wait_state(&f, "split");
    same(
        "f's second own copy after a remount",
        &read_all(&own2_path),
        &f_own3,
    );
    ctl(&f, "release");
    assert_eq!(pair_id(&f), dir_id);
    assert!(gone(&own2_path));
    same(
        "group copy of f after the release of f's pair",
        &read_all(&v.copy_path("d/f")),
        &f_group2,
    );
    put(&f, 21, 9, 64 * KIB);
    same(
        "group copy of f after a write",
        &read_all(&v.copy_path("d/f")),
        &f_group2,
    );

    // Release the group; nothing is left pinned.
    ctl(&d, "release");
    assert!(gone(&v.copy_path("d/f")));
    let live = read_all(&f);
    v.umount();
    let out = v.fsck();
    assert!(out.contains("pinned_only_tracks: 0"), "fsck: {out}");
    v.mount();
    same("f after everything", &read_all(&f), &live);
    v.umount();
    v.fsck();
}

/// With the group not frozen (formed), a file split on its own is at its plain path in
/// the copy mount too (nothing to share it with), the group's later split leaves it out,
/// and after join the group's next update covers it.
#[test]
fn a_file_split_off_a_formed_group_and_joined_back() {
    let mut v = Vol::new("128M");
    v.mount();
    let (d, f, g) = (v.path("d"), v.path("d/f"), v.path("d/g"));
    std::fs::create_dir(&d).unwrap();
    make(&f, 16, 0);
    make(&g, 4, 0);
    ctl(&d, "pair");
    wait_state(&d, "formed");
    // Through the CLI this time.
    let out = pairfs(&["split", f.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let f_own = read_all(&f);
    put(&f, 2, 1, 64 * KIB);
    same(
        "own copy at its path",
        &read_all(&v.copy_path("d/f")),
        &f_own,
    );
    let id = pair_id(&f);
    same(
        "own copy at its stable path",
        &read_all(&v.copy_path(&format!(".pairfs/{id}/d/f"))),
        &f_own,
    );
    // The group's split leaves f (another pair's) out.
    ctl(&d, "split");
    let g_group = read_all(&g);
    same(
        "own copy beside the group",
        &read_all(&v.copy_path("d/f")),
        &f_own,
    );
    same("group copy of g", &read_all(&v.copy_path("d/g")), &g_group);
    let out = pairfs(&["join", f.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Join of a pair that is not a file pair inside a group: refused.
    let out = pairfs(&["join", d.to_str().unwrap()]);
    assert!(!out.status.success(), "join of the group itself");
    assert!(
        gone(&v.copy_path("d/f")),
        "f was not in the group's instant"
    );
    put(&f, 3, 2, 64 * KIB);
    ctl(&d, "update");
    let f_now = read_all(&f);
    put(&f, 3, 3, 64 * KIB);
    wait_state(&d, "split");
    same(
        "group copy of f after join and update",
        &read_all(&v.copy_path("d/f")),
        &f_now,
    );
    v.umount();
    v.fsck();
}

/// Split-offs, updates and joins of a file while a writer rewrites it and its sibling:
/// no deadlock with the copier, the flusher and copy-on-write, the group's frozen copy of
/// both files stays exactly the group's instant throughout, and once the writer stops a
/// split of the file alone equals it byte for byte.
#[test]
fn split_off_under_a_running_writer() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut v = Vol::new("256M");
    v.mount();
    let (d, f, g) = (v.path("d"), v.path("d/f"), v.path("d/g"));
    std::fs::create_dir(&d).unwrap();
    make(&f, 32, 0);
    make(&g, 16, 0);
    ctl(&d, "split");
    let f_group = read_all(&f);
    let g_group = read_all(&g);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, f, g) = (stop.clone(), f.clone(), g.clone());
        std::thread::spawn(move || {
            let files = [
                std::fs::OpenOptions::new().write(true).open(&f).unwrap(),
                std::fs::OpenOptions::new().write(true).open(&g).unwrap(),
            ];
            let mut x: u64 = 0x9e37_79b9;
            let mut ver = 1;
            while !stop.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let k = (x % 2) as usize;
                let b = (x >> 8) % if k == 0 { 40 } else { 16 };
                let len = if x & 1 == 0 { 64 * KIB } else { 3 * KIB };
                files[k]
                    .write_all_at(&block(b, ver, len), b * 64 * KIB as u64)
                    .unwrap();
                if ver % 64 == 0 {
                    files[k].sync_all().unwrap();
                }
                ver += 1;
            }
            ver
        })
    };
    let group_exact = |v: &Vol, step: &str| {
        same(
            &format!("{step}: group copy of f"),
            &read_all(&v.copy_path("d/f")),
            &f_group,
        );
        same(
            &format!("{step}: group copy of g"),
            &read_all(&v.copy_path("d/g")),
            &g_group,
        );
    };
    for round in 0..6 {
        ctl(&f, "split");
        let id = pair_id(&f);
        std::thread::sleep(std::time::Duration::from_millis(100));
        group_exact(&v, &format!("round {round}, split off"));
        let own = v.copy_path(&format!(".pairfs/{id}/d/f"));
        assert!(own.exists(), "round {round}: f's own copy");
        wait_state(&f, "split");
        ctl(&f, "update");
        std::thread::sleep(std::time::Duration::from_millis(100));
        group_exact(&v, &format!("round {round}, updated alone"));
        ctl(&f, if round % 2 == 0 { "join" } else { "release" });
        std::thread::sleep(std::time::Duration::from_millis(50));
        group_exact(&v, &format!("round {round}, joined"));
    }
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().unwrap();
    assert!(writes > 100, "the writer barely ran: {writes} writes");
    ctl(&f, "split");
    let id = pair_id(&f);
    wait_state(&f, "split");
    let f_now = read_all(&f);
    same(
        "f's own copy after the writer stopped",
        &read_all(&v.copy_path(&format!(".pairfs/{id}/d/f"))),
        &f_now,
    );
    group_exact(&v, "after the writer stopped");
    ctl(&f, "join");
    ctl(&d, "update");
    wait_state(&d, "split");
    same(
        "group copy of f after the group update",
        &read_all(&v.copy_path("d/f")),
        &f_now,
    );
    v.umount();
    v.fsck();
}

/// The group is the whole volume (root pair): a file split off it is served beside the
/// root's instant; `mount-snapshot` still shows the root's instant; an update of the root
/// leaves the file out (its own copy moves to its plain path); join brings it back.
#[test]
fn a_file_split_off_the_volume_pair() {
    let mut v = Vol::new("128M");
    v.mount();
    let (f, g) = (v.path("f"), v.path("g"));
    make(&f, 16, 0);
    make(&g, 4, 0);
    ctl(&v.mnt, "split");
    let root_id = pair_id(&v.mnt);
    let f_root = read_all(&f);
    put(&f, 1, 1, 64 * KIB);
    ctl(&f, "split");
    let id = pair_id(&f);
    assert_ne!(id, root_id);
    let f_own = read_all(&f);
    put(&f, 1, 2, 64 * KIB);
    put(&f, 2, 2, 64 * KIB);
    same("root copy of f", &read_all(&v.copy_path("f")), &f_root);
    let own = v.copy_path(&format!(".pairfs/{id}/f"));
    same("own copy of f", &read_all(&own), &f_own);
    // Resync of f's own pair: only its copy goes (formed), the root's stays; split again.
    wait_state(&f, "split");
    ctl(&f, "resync");
    wait_state(&f, "formed");
    assert_eq!(pair_id(&f), id);
    assert!(gone(&own), "f's own copy after its resync");
    same(
        "root copy of f after f's resync",
        &read_all(&v.copy_path("f")),
        &f_root,
    );
    put(&f, 4, 3, 64 * KIB);
    ctl(&f, "split");
    let f_own = read_all(&f);
    put(&f, 4, 4, 64 * KIB);
    same(
        "own copy of f after a resync and split",
        &read_all(&own),
        &f_own,
    );
    same(
        "root copy of f beside it",
        &read_all(&v.copy_path("f")),
        &f_root,
    );
    // The snapshot mount serves the root's instant.
    wait_state(&v.mnt, "split");
    let snap = v.dir.path().join("snap");
    std::fs::create_dir(&snap).unwrap();
    v.mount_snapshot(&snap);
    let r = std::panic::catch_unwind(|| {
        same("snapshot of f", &read_all(&snap.join("f")), &f_root);
    });
    let out = pairfs(&["umount", snap.to_str().unwrap()]);
    assert!(out.status.success());
    r.unwrap();
    // The root's update leaves f (another pair's) out; its own copy is at its path.
    ctl(&v.mnt, "update");
    wait_state(&v.mnt, "split");
    // The snapshot of that instant has g, not f (nor f's own pair's copy).
    let g_root2 = read_all(&g);
    v.mount_snapshot(&snap);
    let r = std::panic::catch_unwind(|| {
        assert!(!snap.join("f").exists(), "f was not in the root's instant");
        assert!(!snap.join(".pairfs").exists());
        same("snapshot of g", &read_all(&snap.join("g")), &g_root2);
    });
    let out = pairfs(&["umount", snap.to_str().unwrap()]);
    assert!(out.status.success());
    r.unwrap();
    same(
        "own copy of f at its path",
        &read_all(&v.copy_path("f")),
        &f_own,
    );
    same("own copy of f, stable path", &read_all(&own), &f_own);
    ctl(&f, "join");
    assert_eq!(pair_id(&f), root_id);
    assert!(gone(&v.copy_path("f")), "f is not in the root's instant");
    let f_now = read_all(&f);
    ctl(&v.mnt, "update");
    put(&f, 3, 3, 64 * KIB);
    wait_state(&v.mnt, "split");
    same(
        "root copy of f after join and update",
        &read_all(&v.copy_path("f")),
        &f_now,
    );
    v.umount();
    v.fsck();
}
