//! A frozen tree is the whole tree as it was (issue 15): hard links, special files,
//! empty and setgid directories, owners, times, xattrs and POSIX ACLs, in the copy mount
//! and in a restore made from it with `tar --xattrs --acls` and `rsync -aHAX`; and the
//! snapshot mount, which serves the same view, holds off root-pair rewrites.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use common::*;

fn sh(dir: &Path, script: &str) -> String {
    let out = Command::new("sh")
        .arg("-ec")
        .arg(script)
        .current_dir(dir)
        .output()
        .expect("run sh");
    assert!(
        out.status.success(),
        "`{script}` in {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Everything we compare about the tree under `dir/top`: one line per object (type,
/// mode, owner, group, size, link count, mtime, symlink target, path), the hard-link
/// groups (paths sharing an inode number), xattrs of every object and file checksums.
fn listing(dir: &Path, top: &str, dir_sizes: bool) -> String {
    let find = sh(
        dir,
        &format!("find {top} -printf '%y %m %U %G %s %n %T@ %l %p\\n' | LC_ALL=C sort -k9"),
    );
    let find: String = find
        .lines()
        .map(|l| {
            // Directory sizes are the filesystem's own (0 here, 4096 on ext4).
            if !dir_sizes && l.starts_with("d ") {
                let mut f: Vec<&str> = l.split(' ').collect();
                f[4] = "-";
                f.join(" ") + "\n"
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for l in sh(dir, &format!("find {top} ! -type d -printf '%i %p\\n'")).lines() {
        let (ino, p) = l.split_once(' ').unwrap();
        groups.entry(ino.into()).or_default().push(p.into());
    }
    let mut links: Vec<String> = groups
        .into_values()
        .filter(|g| g.len() > 1)
        .map(|mut g| {
            g.sort();
            g.join(" = ")
        })
        .collect();
    links.sort();
    let xattrs = sh(dir, &format!("getfattr -R -h -d -m - -e hex {top}"));
    let mut blocks: Vec<&str> = xattrs.split("\n\n").map(str::trim).collect();
    blocks.retain(|b| !b.is_empty());
    blocks.sort();
    let sums = sh(
        dir,
        &format!("find {top} -type f -exec sha256sum {{}} + | LC_ALL=C sort -k2"),
    );
    format!(
        "{find}--- links\n{}\n--- xattrs\n{}\n--- sums\n{sums}",
        links.join("\n"),
        blocks.join("\n\n")
    )
}

/// A capability xattr value (cap_net_raw=ep, VFS_CAP_REVISION_2).
const CAP: &str = "0x0100000200200000000000000000000000000000";

/// The ACL's mask (rwx) becomes the group bits of t/a/f's mode, as on ext4; the
/// restores compare the resulting mode.
fn build_tree(mnt: &Path) {
    sh(
        mnt,
        &format!(
            "mkdir -p t/a t/b t/empty t/sg
             chmod 2775 t/sg
             head -c 300000 /dev/urandom > t/a/f
             ln t/a/f t/b/g
             ln t/a/f t/sg/h
             printf small > t/b/s
             mkfifo t/p
             mknod t/c c 1 3
             ln -s a/f t/l
             ln -s /nowhere/dangling t/b/dl
             setfattr -n user.note -v 'split-time value' t/a/f
             setfattr -n user.dir -v d t/b
             setfattr -n trusted.t -v tv t/b/s
             setfattr -n security.capability -v {CAP} t/b/s
             setfacl -m u:1234:rwx,m::rwx t/a/f
             setfacl -d -m g:55:rx t/sg
             printf owned > t/o
             chown 1000:1001 t/o
             chmod 4751 t/o
             touch -h -d '2001-02-03 04:05:06.789' t/l
             touch -d '1999-12-31 23:59:59.5' t/b/s"
        ),
    );
    std::os::unix::net::UnixListener::bind(mnt.join("t/sock")).unwrap();
}

fn change_everything(mnt: &Path) {
    sh(
        mnt,
        // The truncate drops the capability xattr (the kernel's killpriv).
        "printf changed | dd of=t/a/f conv=notrunc status=none
         truncate -s 5 t/b/s
         chmod 600 t/b/s
         chown 7:7 t/a/f
         touch -d '2020-01-01' t/o
         setfattr -n user.note -v 'later value' t/a/f
         setfattr -n user.new -v n t/a/f
         setfattr -x trusted.t t/b/s
         ! getfattr -h -n security.capability t/b/s 2>/dev/null
         setfacl -b t/a/f
         setfacl -k t/sg
         rm t/b/g t/p t/sock
         ln t/b/s t/a/s2
         mv t/l t/l2
         rmdir t/empty
         mkdir t/newdir
         printf new > t/newdir/n
         rm t/c
         mknod t/c b 7 0",
    );
}

#[test]
fn frozen_tree_keeps_links_specials_xattrs_and_acls() {
    let mut v = Vol::new("1G");
    v.mount();
    build_tree(&v.mnt);
    // A file-scope pair keeps its xattrs too.
    sh(
        &v.mnt,
        "printf solo > solo; setfattr -n user.solo -v one solo",
    );
    let before = listing(&v.mnt, "t", true);
    setx(&v.path("t"), "user.pairfs.split").unwrap();
    setx(&v.path("solo"), "user.pairfs.split").unwrap();
    change_everything(&v.mnt);
    sh(
        &v.mnt,
        "setfattr -n user.solo -v two solo; setfattr -n user.x -v y solo",
    );
    wait_state(&v.path("t"), "split");
    wait_state(&v.path("solo"), "split");
    let copy = listing(&v.copy, "t", true);
    assert_eq!(
        copy, before,
        "the copy mount differs from the split-time tree"
    );
    assert!(before.contains("t/a/f = t/b/g = t/sg/h"), "{before}");
    assert!(before.contains("p 644"), "{before}");
    assert!(before.contains("s 755"), "{before}");
    assert!(before.contains("c 644"), "{before}");
    assert!(before.contains("system.posix_acl_access"), "{before}");
    assert!(
        before.contains("f 674 0 0 300000 3"),
        "setfacl set the group bits: {before}"
    );
    assert!(before.contains("security.capability"), "{before}");
    assert_eq!(
        sh(&v.copy, "getfattr -h -d -m - solo"),
        "# file: solo\nuser.solo=\"one\"\n\n"
    );
    assert!(
        !sh(&v.copy, "getfattr -R -h -d -m - .").contains("pairfs"),
        "internal names leak into the copy"
    );
    // Device number of the frozen character device.
    assert_eq!(sh(&v.copy, "stat -c %t:%T t/c"), "1:3\n");

    // Restores made from the copy mount hold the same tree (tar cannot archive sockets).
    let restore = v.dir.path().join("restore");
    std::fs::create_dir(&restore).unwrap();
    let tarball = v.dir.path().join("t.tar");
    sh(
        &v.copy,
        &format!(
            "tar --format=posix --xattrs --xattrs-include='*' --acls -cf {} t 2>/dev/null || \
             test $? -eq 1",
            tarball.display()
        ),
    );
    sh(
        &restore,
        &format!(
            "tar --xattrs --xattrs-include='*' --acls --same-owner -xpf {}",
            tarball.display()
        ),
    );
    let no_sock = |s: &str| -> String {
        s.lines()
            .filter(|l| !l.starts_with("s ") && !l.contains("t/sock"))
            .map(|l| format!("{l}\n"))
            .collect()
    };
    assert_eq!(
        no_sock(&listing(&restore, "t", false)),
        no_sock(&before_no_dir_sizes(&before)),
        "tar restore from the copy mount differs"
    );
    // --modify-window=-1: rsync otherwise takes times of the same second as equal and
    // leaves a new directory or special file with its creation time.
    let rs = v.dir.path().join("rsync");
    sh(
        &v.copy,
        &format!("rsync -aHAX --modify-window=-1 --numeric-ids t {}/", {
            std::fs::create_dir(&rs).unwrap();
            rs.display()
        }),
    );
    assert_eq!(
        listing(&rs, "t", false),
        before_no_dir_sizes(&before),
        "rsync -aHAX restore from the copy mount differs"
    );

    // Update brings the view to the new instant.
    let now = listing(&v.mnt, "t", true);
    setx(&v.path("t"), "user.pairfs.update").unwrap();
    wait_state(&v.path("t"), "split");
    assert_eq!(listing(&v.copy, "t", true), now, "after update");
    v.umount();
    v.fsck();
    // The frozen view survives a remount (rows in SQLite).
    v.mount();
    assert_eq!(listing(&v.copy, "t", true), now, "after remount");
    v.umount();
}

/// `before` with directory sizes masked, as [`listing`] does with `dir_sizes` false.
fn before_no_dir_sizes(before: &str) -> String {
    let (find, rest) = before.split_once("--- links").unwrap();
    let find: String = find
        .lines()
        .map(|l| {
            if l.starts_with("d ") {
                let mut f: Vec<&str> = l.split(' ').collect();
                f[4] = "-";
                f.join(" ") + "\n"
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    format!("{find}--- links{rest}")
}

#[test]
fn snapshot_mount_serves_the_view_and_holds_off_root_rewrites() {
    let mut v = Vol::new("1G");
    v.mount();
    build_tree(&v.mnt);
    let before = listing(&v.mnt, "t", true);
    setx(&v.mnt, "user.pairfs.split").unwrap();
    change_everything(&v.mnt);
    wait_state(&v.mnt, "split");
    let snap = v.dir.path().join("snap");
    std::fs::create_dir(&snap).unwrap();
    v.mount_snapshot(&snap);
    let r = std::panic::catch_unwind(|| {
        assert_eq!(listing(&snap, "t", true), before, "snapshot mount");
        // The snapshot mount copied the metadata when it mounted; first changes made
        // after that (objects still unchanged since the split) leave it as it was.
        sh(
            &v.mnt,
            "setfattr -n user.dir -v changed-later t/b
             mv t/sg t/sg2
             chmod 700 t/b/dl 2>/dev/null || true
             printf x >> t/o
             rm -r t/a
             mkdir t/after",
        );
        // Past the kernel's 1 s attribute and name cache: the daemon answers.
        std::thread::sleep(std::time::Duration::from_millis(1200));
        assert_eq!(
            listing(&snap, "t", true),
            before,
            "after later live changes"
        );
        for op in [
            "user.pairfs.update",
            "user.pairfs.resync",
            "user.pairfs.release",
        ] {
            let e = setx(&v.mnt, op).expect_err(op);
            assert_eq!(e.raw_os_error(), Some(libc::EBUSY), "{op}: {e}");
        }
        assert!(state(&v.mnt).starts_with("split "));
        assert_eq!(listing(&snap, "t", true), before, "after the refused ops");
    });
    let out = pairfs(&["umount", snap.to_str().unwrap()]);
    assert!(out.status.success());
    r.unwrap();
    // Once `pairfs umount` of the snapshot returned, the update runs; a snapshot mount
    // made after it serves the new instant.
    setx(&v.mnt, "user.pairfs.update").unwrap();
    let now = listing(&v.mnt, "t", true);
    wait_state(&v.mnt, "split");
    v.mount_snapshot(&snap);
    let got = listing(&snap, "t", true);
    let out = pairfs(&["umount", snap.to_str().unwrap()]);
    assert!(out.status.success());
    assert_eq!(got, now, "snapshot after update");
    v.umount();
    v.fsck();
}

/// The kernel may cache copy-mount names and attributes for a second; after an update
/// the copy mount drops them, so names and attributes of the new instant show at once.
#[test]
fn update_is_visible_at_once_through_cached_names() {
    let mut v = Vol::new("1G");
    v.mount();
    sh(
        &v.mnt,
        "mkdir -p u/s; printf v1 > u/x; printf y > u/s/y; chmod 644 u/x",
    );
    setx(&v.path("u"), "user.pairfs.split").unwrap();
    wait_state(&v.path("u"), "split");
    // Fill the kernel's caches.
    assert_eq!(std::fs::read(v.copy_path("u/x")).unwrap(), b"v1");
    assert!(v.copy_path("u/s/y").exists());
    let t0 = std::time::Instant::now();
    sh(
        &v.mnt,
        "printf 'version two' > u/x; chmod 600 u/x; rm u/s/y; printf z > u/s/z",
    );
    setx(&v.path("u"), "user.pairfs.update").unwrap();
    wait_state(&v.path("u"), "split");
    let meta = std::fs::metadata(v.copy_path("u/x")).unwrap();
    let elapsed = t0.elapsed();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    assert_eq!(meta.len(), 11);
    assert_eq!(std::fs::read(v.copy_path("u/x")).unwrap(), b"version two");
    assert!(!v.copy_path("u/s/y").exists());
    assert_eq!(std::fs::read(v.copy_path("u/s/z")).unwrap(), b"z");
    println!("checked {elapsed:?} after the caches were filled");
    v.umount();
}

/// As on ext4: setting an access ACL sets the mode's group bits from its mask (seen at
/// once, not after the attribute cache expires), chmod rewrites the mask, and an ACL
/// equivalent to the mode is not stored.
#[test]
fn access_acl_and_mode_stay_in_step() {
    let mut v = Vol::new("1G");
    v.mount();
    let out = sh(
        &v.mnt,
        "touch f; chmod 644 f; stat -c %a f
         ls -l f >/dev/null; setfacl -m u:1234:rwx f; ls -l f | cut -c1-11
         chmod 640 f; getfacl -n f | grep mask
         setfacl -b f; stat -c %a f; getfattr -d -m - f | wc -l",
    );
    assert_eq!(out, "644\n-rw-rwxr--+\nmask::r--\n640\n0\n");
    v.umount();
}

/// POSIX ACLs on the main mount behave as on the machine's own filesystem (ext4 here):
/// the same commands (a default ACL, files and directories created under it with and
/// without a umask, an access ACL granting and then revoking a user's read) give the same
/// `getfacl` listings, modes and access decisions on both.
#[test]
fn acls_are_enforced_and_inherited_as_on_the_native_filesystem() {
    let mut v = Vol::new("256M");
    v.mount();
    let native = tempfile::Builder::new()
        .prefix("pairfs-acl-native")
        .tempdir_in("/var/tmp")
        .unwrap();
    let script = "umask 027; mkdir d; setfacl -d -m u:nobody:rwx,g::r-x,m::rwx,o::--- d; \
                  touch d/f; mkdir d/sub; touch d/sub/g; mkfifo d/p; \
                  mkdir plain; touch plain/f; mkdir -m 2775 sg; \
                  echo secret > s; chmod 600 s; setfacl -m u:nobody:r s; \
                  if su nobody -s /bin/sh -c 'cat s' >/dev/null 2>&1; then echo granted; fi; \
                  setfacl -x u:nobody s; \
                  if su nobody -s /bin/sh -c 'cat s' >/dev/null 2>&1; then echo still; else echo revoked; fi; \
                  chmod 0770 d/f; \
                  stat -c '%A %n' d d/f d/sub d/sub/g d/p plain/f sg s; \
                  getfacl -p -n d d/f d/sub d/sub/g d/p plain/f s";
    let on_pairfs = sh(&v.mnt, script);
    let on_native = sh(native.path(), script);
    assert_eq!(on_pairfs, on_native, "pairfs vs the native filesystem");
    assert!(on_pairfs.contains("granted") && on_pairfs.contains("revoked"));
    assert!(on_pairfs.contains("default:user:65534:rwx"));
    // Inherited ACLs survive a remount (they are stored xattrs).
    v.umount();
    v.mount();
    let again = sh(&v.mnt, "getfacl -p -n d/f d/sub");
    assert!(again.contains("user:65534:rwx") && again.contains("default:user:65534:rwx"));
    v.umount();
}

/// Issue 15's O(1) split: a paired, formed tree is split lazily (the instant is recorded,
/// each object is frozen just before its first change). Every kind of change afterwards
/// (data, truncate, renames of files and directories inside the tree, unlink, rmdir,
/// new hard links, chmod/chown/utimes, xattrs, files and whole directories moved in and
/// out) leaves the copy mount equal to the listing taken just before the split; so do a
/// remount (frozen rows and epochs from SQLite) and the daemon-down `mount-copy`; an
/// update brings it to the new instant, which again survives changes and a remount.
#[test]
fn lazy_split_of_a_paired_tree_keeps_the_instant_through_every_change() {
    let mut v = Vol::new("1G");
    v.mount();
    build_tree(&v.mnt);
    sh(
        &v.mnt,
        "mkdir -p t/deep/x/y out/sub
         for i in 1 2 3 4 5; do printf \"file $i\" > t/deep/x/y/f$i; done
         head -c 200000 /dev/urandom > t/deep/big
         printf outside > out/o1
         printf inner > out/sub/o2
         setfattr -n user.keep -v k t/deep/x
         mkdir t/many
         for i in $(seq 700); do printf $i > t/many/m$i; done",
    );
    setx(&v.path("t"), "user.pairfs.pair").unwrap();
    wait_state(&v.path("t"), "formed");
    let before = listing(&v.mnt, "t", true);
    let t0 = std::time::Instant::now();
    setx(&v.path("t"), "user.pairfs.split").unwrap();
    println!("split of the paired tree: {:?}", t0.elapsed());
    change_everything(&v.mnt);
    sh(
        &v.mnt,
        "printf more >> t/deep/x/y/f1
         truncate -s 10 t/deep/big
         mv t/deep/x t/moved_x
         mv t/moved_x/y/f2 t/f2_renamed
         mv t/moved_x/y/f3 out/f3_out
         mv t/deep out/deep_out
         mv out/o1 t/in_file
         mv out/sub t/in_dir
         printf changed > t/in_dir/o2
         ln t/moved_x/y/f4 t/f4_link
         chmod 700 t/moved_x
         chown 5:6 t/moved_x/y/f5
         touch -d '2011-11-11' t/moved_x/y
         setfattr -x user.keep t/moved_x
         setfattr -n user.late -v l t/moved_x/y/f4
         rm out/f3_out
         rm t/many/m1*; mv t/many/m5 t/many/m5x; mv t/many/m6 t/m6; touch t/many/new
         printf x >> t/many/m700",
    );
    wait_state(&v.path("t"), "split");
    assert_eq!(
        listing(&v.copy, "t", true),
        before,
        "copy mount after changes"
    );
    v.umount();
    v.fsck();
    // Daemon down: mount-copy reads the same instant from the database.
    let cm = v.dir.path().join("cm");
    std::fs::create_dir(&cm).unwrap();
    let out = pairfs(&[
        "mount-copy",
        v.img.to_str().unwrap(),
        cm.to_str().unwrap(),
        "--daemon",
    ]);
    assert!(
        out.status.success(),
        "mount-copy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = listing(&cm, "t", true);
    assert!(pairfs(&["umount", cm.to_str().unwrap()]).status.success());
    assert_eq!(got, before, "mount-copy with the daemon down");
    v.mount();
    assert_eq!(listing(&v.copy, "t", true), before, "after remount");
    // Changes after the remount still freeze first.
    sh(
        &v.mnt,
        "printf again > t/f2_renamed; rm -r t/moved_x; mv t/in_file t/in_file2",
    );
    assert_eq!(listing(&v.copy, "t", true), before, "after more changes");

    // Update: the new instant, then changes and a remount keep it.
    let now = listing(&v.mnt, "t", true);
    setx(&v.path("t"), "user.pairfs.update").unwrap();
    sh(
        &v.mnt,
        "printf x > t/f2_renamed; mv t/in_dir out/back; mkdir t/later; rm t/f4_link",
    );
    wait_state(&v.path("t"), "split");
    assert_eq!(listing(&v.copy, "t", true), now, "after update");
    v.umount();
    v.fsck();
    v.mount();
    assert_eq!(listing(&v.copy, "t", true), now, "update after remount");
    // SIGKILL right after first changes (some committed by the flusher, some not): the
    // instant is intact after the unclean remount.
    sh(
        &v.mnt,
        "printf y >> t/f2_renamed; mv t/later t/later2; chmod 711 t/a; touch t/new2
         setfattr -n user.k -v 1 t/b/s; rm t/o",
    );
    v.kill9();
    v.fsck();
    v.mount();
    assert_eq!(
        listing(&v.copy, "t", true),
        now,
        "after kill -9 and remount"
    );
    v.umount();
    v.fsck();
}

/// Random first changes inside `t` until `stop` (errors ignored: the daemon may die
/// under them): data, truncate, rename, unlink, chmod, xattrs, new names and links.
/// Returns how many succeeded.
fn mutate(mnt: &Path, seed: u64, stop: &std::sync::atomic::AtomicBool) -> usize {
    use std::os::unix::ffi::OsStrExt;
    let mut x = seed | 1;
    let mut next = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let mut n = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let i = next(300) + 1;
        let p = mnt.join(format!("t/many/m{i}"));
        let r = match next(8) {
            0 => std::fs::OpenOptions::new()
                .append(true)
                .open(&p)
                .and_then(|mut f| std::io::Write::write_all(&mut f, b"appended")),
            1 => std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .and_then(|f| f.set_len(next(3))),
            2 => std::fs::rename(&p, mnt.join(format!("t/many/r{i}-{n}"))),
            3 => std::fs::remove_file(&p),
            4 => std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o600)),
            5 => {
                let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
                // SAFETY: valid C strings and buffer.
                let r = unsafe {
                    libc::setxattr(c.as_ptr(), c"user.k".as_ptr(), b"v".as_ptr().cast(), 1, 0)
                };
                if r == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            }
            6 => std::fs::write(mnt.join(format!("t/new{n}")), b"new"),
            _ => std::fs::hard_link(&p, mnt.join(format!("t/deep/l{i}-{n}"))),
        };
        n += usize::from(r.is_ok());
    }
    n
}

/// A kill -9 of the daemon right after a directory split (no change yet) and in the
/// middle of a stream of first changes: after the remount, the copy mount shows the
/// listing taken just before the split or update, every time.
#[test]
fn kill_9_during_first_changes_after_a_lazy_split_keeps_the_instant() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut v = Vol::new("1G");
    v.mount();
    build_tree(&v.mnt);
    sh(
        &v.mnt,
        "mkdir -p t/deep t/many
         for i in $(seq 300); do printf \"content $i\" > t/many/m$i; done
         head -c 300000 /dev/urandom > t/deep/big",
    );
    setx(&v.path("t"), "user.pairfs.pair").unwrap();
    wait_state(&v.path("t"), "formed");
    for round in 0..5u64 {
        let op = if round == 0 { "split" } else { "update" };
        let before = listing(&v.mnt, "t", true);
        setx(&v.path("t"), &format!("user.pairfs.{op}")).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let changes = if round == 0 {
            // Between the split and the first change.
            0
        } else {
            let (mnt, s) = (v.mnt.clone(), stop.clone());
            let h = std::thread::spawn(move || mutate(&mnt, round * 7919, &s));
            std::thread::sleep(std::time::Duration::from_millis(60 * round));
            v.kill9();
            stop.store(true, Ordering::Relaxed);
            h.join().unwrap()
        };
        if round == 0 {
            v.kill9();
        }
        v.mount();
        assert_eq!(
            listing(&v.copy, "t", true),
            before,
            "round {round} ({op}, {changes} changes before the kill)"
        );
        wait_state(&v.path("t"), "split");
        assert_eq!(
            listing(&v.copy, "t", true),
            before,
            "round {round}: once the copy finished"
        );
        println!("round {round}: {op}, {changes} changes, killed, instant kept");
        assert!(
            round == 0 || changes > 0,
            "round {round}: no change reached the daemon"
        );
    }
    v.umount();
    v.fsck();
}
