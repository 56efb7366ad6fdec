//! Done-when of the foundation: a 1 GiB file and a tree with symlinks, hard links and
//! xattrs read back identical after unmount and remount; plus the limits of names,
//! paths and huge sparse files through a real mount.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use common::*;

fn hash_file(p: &std::path::Path) -> (u64, u64) {
    let mut f = std::fs::File::open(p).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let (mut h, mut n) = (0xcbf29ce484222325u64, 0u64);
    loop {
        let k = f.read(&mut buf).unwrap();
        if k == 0 {
            return (h, n);
        }
        for &b in &buf[..k] {
            h = (h ^ b as u64).wrapping_mul(0x100000001b3);
        }
        n += k as u64;
    }
}

fn getx(p: &std::path::Path, name: &str) -> Vec<u8> {
    let out = std::process::Command::new("getfattr")
        .args(["--only-values", "-n", name])
        .arg(p)
        .output()
        .unwrap();
    assert!(out.status.success(), "getfattr {name} {}", p.display());
    out.stdout
}

#[test]
fn a_gib_file_and_a_tree_survive_remount() {
    let mut v = Vol::new("4G");
    v.mount();
    {
        let mut f = std::fs::File::create(v.path("big")).unwrap();
        for i in 0..1024u64 {
            f.write_all(&block(i, 7, 1 << 20)).unwrap();
        }
        f.sync_all().unwrap();
    }
    let big = hash_file(&v.path("big"));
    assert_eq!(big.1, 1 << 30);
    std::fs::create_dir_all(v.path("t/a/b")).unwrap();
    std::fs::write(v.path("t/a/b/file"), b"payload").unwrap();
    std::fs::set_permissions(v.path("t/a/b/file"), std::fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::symlink("a/b/file", v.path("t/link")).unwrap();
    std::os::unix::fs::symlink("/nowhere/dangling", v.path("t/dangling")).unwrap();
    std::fs::hard_link(v.path("t/a/b/file"), v.path("t/hard")).unwrap();
    let st = std::process::Command::new("setfattr")
        .args(["-n", "user.colour", "-v", "blue"])
        .arg(v.path("t/a/b/file"))
        .status()
        .unwrap();
    assert!(st.success());
    let st = std::process::Command::new("setfattr")
        .args(["-n", "user.bin", "-v", "0x00ff10"])
        .arg(v.path("t/a"))
        .status()
        .unwrap();
    assert!(st.success());
    let before = std::fs::metadata(v.path("t/a/b/file")).unwrap();
    v.umount();
    v.fsck();
    v.mount();
    assert_eq!(
        hash_file(&v.path("big")),
        big,
        "1 GiB file changed across remount"
    );
    assert_eq!(std::fs::read(v.path("t/link")).unwrap(), b"payload");
    assert_eq!(
        std::fs::read_link(v.path("t/dangling")).unwrap().to_str(),
        Some("/nowhere/dangling")
    );
    let a = std::fs::metadata(v.path("t/a/b/file")).unwrap();
    let h = std::fs::metadata(v.path("t/hard")).unwrap();
    assert_eq!(a.ino(), h.ino(), "hard link lost its identity");
    assert_eq!(a.nlink(), 2);
    assert_eq!(a.mode() & 0o7777, 0o640);
    assert_eq!(a.mtime_nsec(), before.mtime_nsec());
    assert_eq!(a.mtime(), before.mtime());
    assert_eq!(getx(&v.path("t/hard"), "user.colour"), b"blue");
    assert_eq!(getx(&v.path("t/a"), "user.bin"), b"\x00\xff\x10");
    v.umount();
}

#[test]
fn names_paths_and_huge_sparse_files() {
    let mut v = Vol::new("1G");
    v.mount();
    // 255-byte names work, 256 are refused.
    let ok = "n".repeat(255);
    std::fs::write(v.path(&ok), b"x").unwrap();
    let e = std::fs::write(v.path(&"n".repeat(256)), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENAMETOOLONG));
    // A deep path.
    let mut p = v.mnt.clone();
    for i in 0..200 {
        p.push(format!("d{i}"));
    }
    std::fs::create_dir_all(&p).unwrap();
    std::fs::write(p.join("leaf"), b"deep").unwrap();
    // A sparse file past 1 TiB on a 1 GiB volume: holes take no space.
    let tib = 1u64 << 40;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(v.path("sparse"))
        .unwrap();
    f.set_len(2 * tib).unwrap();
    f.seek(SeekFrom::Start(tib + tib / 2)).unwrap();
    f.write_all(b"far away").unwrap();
    f.sync_all().unwrap();
    let m = f.metadata().unwrap();
    assert_eq!(m.len(), 2 * tib);
    assert!(
        m.blocks() * 512 <= 1 << 20,
        "holes must stay sparse ({} blocks)",
        m.blocks()
    );
    let mut buf = [0u8; 8];
    f.seek(SeekFrom::Start(tib + tib / 2)).unwrap();
    f.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"far away");
    f.seek(SeekFrom::Start(tib)).unwrap();
    f.read_exact(&mut buf).unwrap();
    assert_eq!(buf, [0u8; 8]);
    // SEEK_DATA finds the data, SEEK_HOLE the hole after it.
    use std::os::unix::io::AsRawFd;
    // SAFETY: lseek on an open fd.
    let data = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_DATA) };
    assert!(
        data >= 0 && (data as u64) <= tib + tib / 2 && (data as u64) > tib,
        "SEEK_DATA -> {data}"
    );
    // SAFETY: as above.
    let hole = unsafe { libc::lseek(f.as_raw_fd(), data, libc::SEEK_HOLE) };
    assert!(hole as u64 > tib + tib / 2, "SEEK_HOLE -> {hole}");
    // Splitting it is instant and the copy reads the same.
    drop(f);
    setx(&v.path("sparse"), "user.pairfs.split").unwrap();
    wait_state(&v.path("sparse"), "split");
    let c = std::fs::File::open(v.copy_path("sparse")).unwrap();
    assert_eq!(c.metadata().unwrap().len(), 2 * tib);
    let mut cb = [0u8; 8];
    std::os::unix::fs::FileExt::read_exact_at(&c, &mut cb, tib + tib / 2).unwrap();
    assert_eq!(&cb, b"far away");
    drop(c);
    v.umount();
    v.fsck();
}
