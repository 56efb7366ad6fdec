//! Seed 004, third embodiment, kill -9 rounds through a real mount (its own test binary:
//! the kills and remounts do not share a process with other mount tests). See
//! `tests/group_split.rs` for the single steps.

mod common;

use std::os::unix::fs::FileExt;

use common::*;

const KIB: usize = 1024;

/// Kill -9 rounds: the group's instant is taken once; a writer rewrites the sibling g
/// (copy-on-write for the group) while the test writes f (each write fsync'd), splits f
/// on its own, updates it alone, joins or releases it, and kills the daemon at a random
/// moment. After each kill: fsck is clean, f reads back exactly, the group's frozen copy
/// of f and g is exactly its instant, and f's own frozen copy (when its split or update
/// returned before the kill) is exactly f at that instant, also after the copier finished.
#[test]
fn kill9_rounds_keep_both_frozen_copies() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut v = Vol::new("256M");
    v.mount();
    let (d, f, g) = (v.path("d"), v.path("d/f"), v.path("d/g"));
    std::fs::create_dir(&d).unwrap();
    make(&f, 24, 0);
    make(&g, 24, 0);
    ctl(&d, "split");
    let f_group = read_all(&f);
    let g_group = read_all(&g);
    let mut x: u64 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("group kill9 rounds: seed {x:#x}");
    let mut rnd = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    // f's own pair: (id, content at its last returned split/update).
    let mut own: Option<(u64, Vec<u8>)> = None;
    let mut ver = 100;
    for round in 0..8 {
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (stop, g) = (stop.clone(), g.clone());
            std::thread::spawn(move || {
                let Ok(h) = std::fs::OpenOptions::new().write(true).open(&g) else {
                    return;
                };
                let mut k: u64 = round + 1;
                while !stop.load(Ordering::Relaxed) {
                    k = k.wrapping_mul(6364136223846793005).wrapping_add(1);
                    let b = (k >> 33) % 24;
                    if h.write_all_at(&block(b, k, 64 * KIB), b * 64 * KIB as u64)
                        .is_err()
                    {
                        return;
                    }
                }
            })
        };
        for _ in 0..4 {
            ver += 1;
            put(&f, rnd(30), ver, 64 * KIB);
            match (rnd(4), own.is_some()) {
                (0 | 1, false) => {
                    ctl(&f, "split");
                    own = Some((pair_id(&f), read_all(&f)));
                }
                (0 | 1, true) if setx(&f, "user.pairfs.update").is_ok() => {
                    own.as_mut().unwrap().1 = read_all(&f);
                }
                (2, true) => {
                    ctl(&f, if rnd(2) == 0 { "join" } else { "release" });
                    own = None;
                }
                _ => {}
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(rnd(200)));
        let f_live = read_all(&f);
        v.kill9();
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        v.fsck();
        v.mount();
        let ctx = format!("round {round}");
        same(&format!("{ctx}: f"), &read_all(&f), &f_live);
        for when in ["after the kill", "copied"] {
            if when == "copied" {
                wait_state(&d, "split");
                if own.is_some() {
                    wait_state(&f, "split");
                }
            }
            same(
                &format!("{ctx} {when}: group copy of f"),
                &read_all(&v.copy_path("d/f")),
                &f_group,
            );
            same(
                &format!("{ctx} {when}: group copy of g"),
                &read_all(&v.copy_path("d/g")),
                &g_group,
            );
            if let Some((id, want)) = &own {
                assert_eq!(pair_id(&f), *id, "{ctx}: f's own pair after the kill");
                same(
                    &format!("{ctx} {when}: f's own copy"),
                    &read_all(&v.copy_path(&format!(".pairfs/{id}/d/f"))),
                    want,
                );
            }
        }
    }
    v.umount();
    v.fsck();
}
