//! Regression tests of the fstests findings (issue 14), each on a real mount: open
//! directories outliving rmdir, readdir passes during renames, atime policies,
//! SEEK_DATA/SEEK_HOLE at negative offsets, remount through the mount helper, file
//! handles across a remount, set-id bits after an unprivileged fallocate, the mount
//! source, a second mount of a mounted volume, and unmount-then-mount.
mod common;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{BIN, Vol, pairfs};

fn mount_with(v: &Vol, opts: &str) {
    let out = pairfs(&[
        "mount",
        v.img.to_str().unwrap(),
        v.mnt.to_str().unwrap(),
        "-o",
        opts,
        "--daemon",
    ]);
    assert!(
        out.status.success(),
        "mount -o {opts}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn umount(p: &Path) {
    let out = Command::new("umount").arg(p).output().unwrap();
    assert!(
        out.status.success(),
        "umount: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

#[test]
fn open_directory_survives_rmdir_and_rename_over() {
    let mut v = Vol::new("1G");
    v.mount();
    std::fs::create_dir(v.path("d")).unwrap();
    let d = std::fs::File::open(v.path("d")).unwrap();
    std::fs::remove_dir(v.path("d")).unwrap();
    let m = d.metadata().unwrap();
    assert!(m.is_dir());
    assert_eq!(m.nlink(), 0, "fstat of a removed open directory");
    drop(d);

    std::fs::create_dir(v.path("a")).unwrap();
    std::fs::create_dir(v.path("b")).unwrap();
    let b = std::fs::File::open(v.path("b")).unwrap();
    std::fs::rename(v.path("a"), v.path("b")).unwrap();
    assert_eq!(b.metadata().unwrap().nlink(), 0, "renamed-over directory");
    // Nothing can be created in it.
    drop(b);
    assert_eq!(std::fs::metadata(v.path("b")).unwrap().nlink(), 2);
    v.umount();
    v.fsck();
}

#[test]
fn readdir_while_renaming_returns_each_name_once_and_ends() {
    let mut v = Vol::new("1G");
    v.mount();
    let dir = v.path("many");
    std::fs::create_dir(&dir).unwrap();
    let n = 3000;
    for i in 0..n {
        std::fs::write(dir.join(format!("f{i}")), b"").unwrap();
    }
    let mut seen = std::collections::HashSet::new();
    for e in std::fs::read_dir(&dir).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        assert!(seen.insert(name.clone()), "{name} returned twice");
        assert!(seen.len() <= n, "readdir does not end");
        std::fs::rename(dir.join(&name), dir.join(format!("{name}x"))).unwrap();
    }
    assert_eq!(seen.len(), n);
    // A new pass sees the new names.
    let again = std::fs::read_dir(&dir).unwrap().count();
    assert_eq!(again, n);
    v.umount();
}

#[test]
fn seek_data_and_hole_at_negative_offsets_give_enxio() {
    let mut v = Vol::new("1G");
    v.mount();
    std::fs::write(v.path("f"), vec![1u8; 100_000]).unwrap();
    let f = std::fs::File::open(v.path("f")).unwrap();
    for whence in [libc::SEEK_DATA, libc::SEEK_HOLE] {
        // SAFETY: lseek on a valid fd.
        let r = unsafe { libc::lseek(std::os::unix::io::AsRawFd::as_raw_fd(&f), -1, whence) };
        assert_eq!(r, -1);
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::ENXIO)
        );
    }
    drop(f);
    v.umount();
}

fn atime(p: &Path) -> i64 {
    let m = std::fs::metadata(p).unwrap();
    m.atime() * 1_000_000_000 + m.atime_nsec()
}

/// Reads `f` twice, 20 ms apart after a write: returns whether each read moved the atime.
fn two_reads(f: &Path) -> (bool, bool) {
    std::fs::write(f, b"data").unwrap();
    let a0 = atime(f);
    std::thread::sleep(Duration::from_millis(20));
    std::fs::read(f).unwrap();
    let a1 = atime(f);
    std::thread::sleep(Duration::from_millis(20));
    std::fs::read(f).unwrap();
    let a2 = atime(f);
    (a1 > a0, a2 > a1)
}

#[test]
fn atime_follows_relatime_strictatime_and_noatime() {
    let mut v = Vol::new("1G");
    v.mount();
    // relatime (default): the first read after a change, not the second.
    assert_eq!(two_reads(&v.path("f")), (true, false));
    // The directory's atime moves on its first listing after a change.
    let d0 = atime(&v.mnt);
    std::thread::sleep(Duration::from_millis(20));
    std::fs::read_dir(&v.mnt).unwrap().count();
    assert!(atime(&v.mnt) > d0, "directory atime");
    v.umount();
    mount_with(&v, "strictatime");
    assert_eq!(two_reads(&v.path("f")), (true, true));
    umount(&v.mnt);
    mount_with(&v, "noatime");
    assert_eq!(two_reads(&v.path("f")), (false, false));
    umount(&v.mnt);
    // After a remount read-only, reads do not write atimes.
    mount_with(&v, "strictatime");
    std::fs::write(v.path("g"), b"x").unwrap();
    let out = pairfs(&[
        "mount",
        v.img.to_str().unwrap(),
        v.mnt.to_str().unwrap(),
        "-o",
        "remount,ro",
    ]);
    assert!(out.status.success());
    let a0 = atime(&v.path("g"));
    std::thread::sleep(Duration::from_millis(20));
    std::fs::read(v.path("g")).unwrap();
    assert_eq!(
        atime(&v.path("g")),
        a0,
        "atime written on a read-only mount"
    );
    umount(&v.mnt);
}

#[test]
fn helper_remounts_read_only_and_back_and_is_silent() {
    let v = Vol::new("1G");
    let helper = v.dir.path().join("mount.fuse.pairfs");
    std::os::unix::fs::symlink(BIN, &helper).unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(&helper)
            .args(args)
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.stderr.is_empty() && out.stdout.is_empty(),
            "helper not silent: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let (img, mnt) = (v.img.to_str().unwrap(), v.mnt.to_str().unwrap());
    run(&[img, mnt, "-o", "rw"]);
    std::fs::write(v.path("f"), b"1").unwrap();
    run(&[img, mnt, "-o", "remount,ro"]);
    let e = std::fs::write(v.path("f"), b"2").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    assert_eq!(std::fs::read(v.path("f")).unwrap(), b"1");
    run(&[img, mnt, "-o", "remount,rw"]);
    std::fs::write(v.path("f"), b"3").unwrap();
    // As a helper (as root) it mounts dev,suid, as mount.fuse3 does; the remounts keep
    // those flags, and nosuid given at mount time.
    let opts = || {
        let o = Command::new("findmnt")
            .args(["-n", "-o", "OPTIONS", mnt])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert!(opts().starts_with("rw,relatime"), "{}", opts());
    umount(&v.mnt);
    run(&[img, mnt, "-o", "nosuid"]);
    run(&[img, mnt, "-o", "remount,ro"]);
    assert!(opts().starts_with("ro,nosuid,relatime"), "{}", opts());
    run(&[img, mnt, "-o", "remount,rw"]);
    assert!(opts().starts_with("rw,nosuid,relatime"), "{}", opts());
    // pairfs' own options cannot change on a remount.
    let out = Command::new(&helper)
        .args([img, mnt, "-o", "remount,threads=2"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    umount(&v.mnt);
    // Unmount and mount again at once, several times: the lock of the daemon that is
    // still finishing is waited for.
    for _ in 0..5 {
        run(&[img, mnt]);
        std::fs::write(v.path("f"), b"4").unwrap();
        umount(&v.mnt);
    }
}

#[test]
fn mount_source_is_the_volume_and_a_second_mount_shares_it() {
    let mut v = Vol::new("1G");
    v.mount();
    let source = |m: &Path| {
        let out = Command::new("findmnt")
            .args(["-n", "-o", "SOURCE", m.to_str().unwrap()])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(source(&v.mnt), v.img.to_str().unwrap());
    // Mounting it again gives a second mountpoint of the same file system.
    let other = v.dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let out = pairfs(&[
        "mount",
        v.img.to_str().unwrap(),
        other.to_str().unwrap(),
        "--daemon",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(source(&other), v.img.to_str().unwrap());
    std::fs::write(v.path("f"), b"one").unwrap();
    assert_eq!(std::fs::read(other.join("f")).unwrap(), b"one");
    std::fs::rename(other.join("f"), other.join("g")).unwrap();
    assert_eq!(std::fs::read(v.path("g")).unwrap(), b"one");
    // With its copy mount option it cannot be shared: refused, saying where it is.
    let copy2 = v.dir.path().join("copy2");
    std::fs::create_dir(&copy2).unwrap();
    let third = v.dir.path().join("third");
    std::fs::create_dir(&third).unwrap();
    let out = pairfs(&[
        "mount",
        v.img.to_str().unwrap(),
        third.to_str().unwrap(),
        "-o",
        &format!("copy_mount={}", copy2.display()),
        "--daemon",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("already mounted on {}", v.mnt.display())),
        "{err}"
    );
    // Unmounting one leaves the other served; `pairfs umount` returns at once.
    let t = std::time::Instant::now();
    let out = pairfs(&["umount", other.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(std::fs::read(v.path("g")).unwrap(), b"one");
    v.umount();
    v.fsck();
}

#[test]
fn file_handles_open_after_a_remount() {
    let mut v = Vol::new("1G");
    v.mount();
    std::fs::create_dir(v.path("d")).unwrap();
    std::fs::write(v.path("d/f"), b"handle").unwrap();
    // struct file_handle with room for 128 bytes of handle.
    let mut buf = vec![0u8; 8 + 128];
    buf[0..4].copy_from_slice(&128u32.to_ne_bytes());
    let mut mount_id = 0;
    let p = cstr(&v.path("d/f"));
    // SAFETY: valid C string and a buffer laid out as struct file_handle.
    let r = unsafe {
        libc::name_to_handle_at(
            libc::AT_FDCWD,
            p.as_ptr(),
            buf.as_mut_ptr().cast(),
            &mut mount_id,
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "name_to_handle_at: {}",
        std::io::Error::last_os_error()
    );
    v.umount();
    v.mount();
    let root = std::fs::File::open(&v.mnt).unwrap();
    // SAFETY: a valid mount fd and the handle filled in above.
    let fd = unsafe {
        libc::open_by_handle_at(
            std::os::unix::io::AsRawFd::as_raw_fd(&root),
            buf.as_mut_ptr().cast(),
            libc::O_RDONLY,
        )
    };
    assert!(
        fd >= 0,
        "open_by_handle_at: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: we own the new fd.
    let mut f = unsafe { <std::fs::File as std::os::unix::io::FromRawFd>::from_raw_fd(fd) };
    let mut s = String::new();
    std::io::Read::read_to_string(&mut f, &mut s).unwrap();
    assert_eq!(s, "handle");
    drop(f);
    // A removed file's handle is stale once the kernel let the inode go. The FUSE
    // release of the file closed above is asynchronous and holds the kernel's inode
    // until it is answered, and the kernel decodes a handle of a cached inode without
    // asking pairfs (as ext4 does): so drop the caches (generic/426 does too) and allow
    // the release a moment.
    std::fs::remove_file(v.path("d/f")).unwrap();
    let mut last = (0, None);
    for _ in 0..50 {
        std::fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
        // SAFETY: as above.
        let fd = unsafe {
            libc::open_by_handle_at(
                std::os::unix::io::AsRawFd::as_raw_fd(&root),
                buf.as_mut_ptr().cast(),
                libc::O_RDONLY,
            )
        };
        last = (fd, std::io::Error::last_os_error().raw_os_error());
        if fd < 0 {
            break;
        }
        // SAFETY: we own the fd the kernel gave back from its cache.
        unsafe { libc::close(fd) };
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(last, (-1, Some(libc::ESTALE)));
    drop(root);
    v.umount();
}

#[test]
fn unprivileged_fallocate_clears_set_id_bits() {
    let mut v = Vol::new("1G");
    v.mount();
    std::fs::set_permissions(&v.mnt, std::fs::Permissions::from_mode(0o777)).unwrap();
    for (mode, root, want) in [
        (0o6666, false, 0o666),
        (0o6676, false, 0o676),
        (0o6766, false, 0o766),
        (0o6666, true, 0o6666),
    ] {
        let f = v.path("f");
        let _ = std::fs::remove_file(&f);
        std::fs::write(&f, vec![0u8; 65536]).unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
        for args in [
            &["-l", "131072"][..],
            &["-o", "0", "-l", "4096"][..],
            &["-p", "-o", "0", "-l", "4096"][..],
            &["-z", "-o", "0", "-l", "4096"][..],
        ] {
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
            let mut c = if root {
                Command::new("fallocate")
            } else {
                let mut c = Command::new("setpriv");
                c.args([
                    "--reuid=65534",
                    "--regid=65534",
                    "--clear-groups",
                    "fallocate",
                ]);
                c
            };
            let out = c.args(args).arg(&f).output().unwrap();
            assert!(
                out.status.success(),
                "fallocate {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let got = std::fs::metadata(&f).unwrap().mode() & 0o7777;
            assert_eq!(got, want, "mode {mode:o}, root {root}, fallocate {args:?}");
        }
    }
    v.umount();
}

#[test]
fn rename_whiteout_leaves_a_whiteout() {
    let mut v = Vol::new("1G");
    v.mount();
    std::fs::write(v.path("a"), b"x").unwrap();
    let (a, b) = (cstr(&v.path("a")), cstr(&v.path("b")));
    // SAFETY: valid C strings.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_WHITEOUT,
        )
    };
    assert_eq!(r, 0, "renameat2: {}", std::io::Error::last_os_error());
    assert_eq!(std::fs::read(v.path("b")).unwrap(), b"x");
    let m = std::fs::symlink_metadata(v.path("a")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_char_device(
        &m.file_type()
    ));
    assert_eq!(m.rdev(), 0);
    v.umount();
    v.fsck();
}

#[test]
fn space_freed_by_a_removal_is_usable_at_once() {
    let mut v = Vol::new("256M");
    v.mount();
    // Most of the volume, removed and allocated again without waiting for a commit.
    for _ in 0..3 {
        let out = Command::new("fallocate")
            .args(["-l", "200M"])
            .arg(v.path("big"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "fallocate: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::remove_file(v.path("big")).unwrap();
    }
    std::fs::write(v.path("f"), vec![7u8; 150 << 20]).unwrap();
    std::fs::remove_file(v.path("f")).unwrap();
    std::fs::write(v.path("f"), vec![7u8; 150 << 20]).unwrap();
    v.umount();
    v.fsck();
}
