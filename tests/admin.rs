//! The operator's view: mount helper and fstab-style mounts, status JSON, completions,
//! and bad input refused with one clear line (never a panic, nothing modified).

mod common;

use std::process::Command;

use common::*;

fn run(cmd: &mut Command) -> (bool, String, String) {
    let o = cmd.output().expect("spawn");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn refused(args: &[&str]) -> String {
    let o = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "pairfs {args:?} should fail");
    assert!(!err.contains("panicked"), "pairfs {args:?} panicked: {err}");
    assert!(!err.trim().is_empty(), "pairfs {args:?} failed silently");
    err
}

#[test]
fn mount_helper_and_fstab_style_mount() {
    let v = Vol::new("1G");
    // mount(8) runs /sbin/mount.fuse.pairfs SOURCE DIR -o OPTIONS.
    let helper = v.dir.path().join("mount.fuse.pairfs");
    std::os::unix::fs::symlink(BIN, &helper).unwrap();
    let opts = format!("rw,relatime,copy_mount={},threads=2", v.copy.display());
    let (ok, _, err) = run(Command::new(&helper)
        .arg(&v.img)
        .arg(&v.mnt)
        .arg("-o")
        .arg(&opts));
    assert!(ok, "helper mount failed: {err}");
    std::fs::write(v.mnt.join("x"), b"fstab").unwrap();
    setx(&v.mnt.join("x"), "user.pairfs.split").unwrap();
    wait_state(&v.mnt.join("x"), "split");
    assert_eq!(std::fs::read(v.copy.join("x")).unwrap(), b"fstab");
    // Plain umount(8) works, and the daemon exits.
    let (ok, _, err) = run(Command::new("umount").arg(&v.mnt));
    assert!(ok, "umount: {err}");
    wait_unlocked(&v);
    // `mount -t fuse.pairfs` through /sbin/mount.fuse.pairfs, as an admin installs it.
    let sbin = std::path::Path::new("/sbin/mount.fuse.pairfs");
    let installed_here = !sbin.exists() && std::os::unix::fs::symlink(BIN, sbin).is_ok();
    if sbin.exists() {
        let (ok, _, err) = run(Command::new("mount")
            .args(["-t", "fuse.pairfs"])
            .arg(&v.img)
            .arg(&v.mnt)
            .arg("-o")
            .arg(format!("copy_mount={}", v.copy.display())));
        assert!(ok, "mount -t fuse.pairfs: {err}");
        assert_eq!(std::fs::read(v.mnt.join("x")).unwrap(), b"fstab");
        let (ok, _, err) = run(Command::new(BIN).arg("umount").arg(&v.mnt));
        assert!(ok, "pairfs umount: {err}");
    }
    if installed_here {
        let _ = std::fs::remove_file(sbin);
    }
    wait_unlocked(&v);
}

#[test]
fn status_json_and_completions() {
    let mut v = Vol::new("1G");
    v.mount();
    std::fs::write(v.path("a"), vec![7u8; 300_000]).unwrap();
    let (ok, out, err) = run(Command::new(BIN).args(["split", "--wait"]).arg(v.path("a")));
    assert!(ok, "split --wait: {err}");
    assert!(out.contains("split pair="), "{out}");
    let (ok, out, err) = run(Command::new(BIN).args(["status", "--json"]).arg(&v.mnt));
    assert!(ok, "status: {err}");
    let j: serde_json::Value = serde_json::from_str(&out).expect("status --json is JSON");
    assert_eq!(j[0]["state"], "split");
    assert_eq!(j[0]["path"], "/a");
    assert_eq!(j[0]["to_copy"], 0);
    assert_eq!(j[0]["frozen_tracks"], 5);
    let (ok, out, _) = run(Command::new(BIN).arg("status").arg(v.path("a")));
    assert!(ok && out.contains("split"), "{out}");
    for sh in ["bash", "zsh", "fish"] {
        let (ok, out, _) = run(Command::new(BIN).args(["gen", "completions", sh]));
        assert!(
            ok && out.contains("split") && out.len() > 500,
            "{sh} completions"
        );
    }
    v.umount();
}

#[test]
fn bad_input_is_refused_with_one_line() {
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n).to_str().unwrap().to_string();
    let mnt = p("mnt");
    std::fs::create_dir(&mnt).unwrap();
    // CLI: invalid sizes and options.
    for args in [
        vec!["mkfs", &p("v"), "--size", "10X"],
        vec!["mkfs", &p("v"), "--size", "1G", "--track-size", "3K"],
        vec!["mkfs", &p("v"), "--size", "1G", "--track-size", "2M"],
        vec!["mkfs", &p("v"), "--size", "64K"],
        vec!["mount", &p("v"), &mnt, "--threads", "0"],
    ] {
        refused(&args);
    }
    // Missing image, missing mountpoint.
    let e = refused(&["mount", &p("missing.img"), &mnt]);
    assert!(e.contains("missing.img"), "{e}");
    assert!(
        Command::new(BIN)
            .args(["mkfs", &p("v"), "--size", "256M"])
            .output()
            .unwrap()
            .status
            .success()
    );
    let e = refused(&["mount", &p("v"), &p("nowhere")]);
    assert!(e.contains("nowhere"), "{e}");
    // Existing volume without --force.
    refused(&["mkfs", &p("v"), "--size", "256M"]);
    // A foreign image (another volume's), nothing modified.
    assert!(
        Command::new(BIN)
            .args(["mkfs", &p("w"), "--size", "256M"])
            .output()
            .unwrap()
            .status
            .success()
    );
    let before = std::fs::read(p("v.meta")).unwrap();
    let e = refused(&["mount", &p("v"), &mnt, "--copy", &p("w.copy")]);
    assert!(e.contains("another volume"), "{e}");
    let e = refused(&["mount", &p("w"), &mnt, "--meta", &p("v.meta")]);
    assert!(e.contains("another volume") || e.contains("UUID"), "{e}");
    assert_eq!(
        std::fs::read(p("v.meta")).unwrap(),
        before,
        "a refused mount modified the database"
    );
    // A truncated image, a wrong-size copy image.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(p("w"))
        .unwrap();
    f.set_len(1 << 20).unwrap();
    let e = refused(&["mount", &p("w"), &mnt]);
    assert!(e.contains("truncated") || e.contains("bytes"), "{e}");
    let o = Command::new(BIN).args(["fsck", &p("w")]).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "fsck of a truncated image: {out}");
    assert!(out.contains("PROBLEM: volume image is"), "{out}");
    // A corrupt database, and one of a future schema version.
    std::fs::write(
        p("v.meta"),
        b"garbage garbage garbage garbage garbage garbage garbage",
    )
    .unwrap();
    let e = refused(&["mount", &p("v"), &mnt]);
    assert!(e.contains("not a pairfs database"), "{e}");
    assert!(
        Command::new(BIN)
            .args(["mkfs", &p("u"), "--size", "256M"])
            .output()
            .unwrap()
            .status
            .success()
    );
    let c = rusqlite_free_update(&p("u.meta"));
    assert!(c, "could not edit the schema version");
    let e = refused(&["mount", &p("u"), &mnt]);
    assert!(e.contains("schema version"), "{e}");
    // Not a pairfs mount.
    refused(&["split", &mnt]);
    refused(&["umount", &mnt]);
}

/// Waits until the daemon of `v` has exited (fsck can lock the volume), then checks.
fn wait_unlocked(v: &Vol) {
    for _ in 0..500 {
        let o = Command::new(BIN).arg("fsck").arg(&v.img).output().unwrap();
        if !String::from_utf8_lossy(&o.stderr).contains("is mounted") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    v.fsck();
}

/// Bumps the schema version with the sqlite3 CLI (keeps the test free of new deps).
fn rusqlite_free_update(db: &str) -> bool {
    Command::new("sqlite3")
        .arg(db)
        .arg("UPDATE super SET value = '99' WHERE key = 'schema_version'")
        .status()
        .is_ok_and(|s| s.success())
}
