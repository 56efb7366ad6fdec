//! Shared helpers of the mount tests: a volume in a temp dir, mounted through
//! /dev/fuse with the real binary, unmounted when the guard drops.
#![allow(dead_code)]

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_pairfs");

pub struct Vol {
    pub dir: tempfile::TempDir,
    pub img: PathBuf,
    pub mnt: PathBuf,
    pub copy: PathBuf,
    mounted: bool,
}

pub fn pairfs(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).output().expect("run pairfs")
}

impl Vol {
    /// mkfs a volume of `size` (e.g. "4G") in a fresh directory on the real disk.
    pub fn new(size: &str) -> Vol {
        let base = std::env::var("PAIRFS_TEST_DIR").unwrap_or_else(|_| "/var/tmp".into());
        std::fs::create_dir_all(&base).unwrap();
        let dir = tempfile::Builder::new()
            .prefix("pairfs-test")
            .tempdir_in(base)
            .unwrap();
        let img = dir.path().join("vol.img");
        let mnt = dir.path().join("mnt");
        let copy = dir.path().join("copy");
        std::fs::create_dir(&mnt).unwrap();
        std::fs::create_dir(&copy).unwrap();
        let out = pairfs(&["mkfs", img.to_str().unwrap(), "--size", size]);
        assert!(
            out.status.success(),
            "mkfs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Vol {
            dir,
            img,
            mnt,
            copy,
            mounted: false,
        }
    }

    pub fn mount(&mut self) {
        self.mount_with(&[]);
    }

    /// [`Vol::mount`] with `-o OPTS` added.
    pub fn mount_opts(&mut self, opts: &str) {
        self.mount_with(&["-o", opts]);
    }

    fn mount_with(&mut self, extra: &[&str]) {
        let mut args = vec![
            "mount",
            self.img.to_str().unwrap(),
            self.mnt.to_str().unwrap(),
            "--copy-mount",
            self.copy.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        args.push("--daemon");
        let out = pairfs(&args);
        assert!(
            out.status.success(),
            "mount {extra:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.mounted = true;
    }

    /// The volume was mounted by the test itself (with options `mount` has no helper
    /// for): unmount it when the guard drops.
    pub fn adopt_mount(&mut self) {
        self.mounted = true;
    }

    pub fn umount(&mut self) {
        let out = pairfs(&["umount", self.mnt.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "umount: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.mounted = false;
    }

    /// Kills this volume's daemon with SIGKILL (no last commit, no clean flag), waits
    /// until it is gone and lazily unmounts its dead mounts.
    pub fn kill9(&mut self) {
        kill9_mount(&self.img, &[&self.mnt, &self.copy]);
        self.mounted = false;
    }

    /// `pairfs mount-snapshot` of this volume on `dir` (daemonized), asserting it mounted.
    pub fn mount_snapshot(&self, dir: &Path) {
        let out = pairfs(&[
            "mount-snapshot",
            self.img.to_str().unwrap(),
            dir.to_str().unwrap(),
            "--daemon",
        ]);
        assert!(
            out.status.success(),
            "mount-snapshot: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    pub fn copy_path(&self, rel: &str) -> PathBuf {
        self.copy.join(rel)
    }

    pub fn fsck(&self) -> String {
        let out = pairfs(&["fsck", self.img.to_str().unwrap()]);
        let s = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "fsck found problems:\n{s}");
        s
    }
}

impl Drop for Vol {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new(BIN)
                .args(["umount", self.mnt.to_str().unwrap()])
                .output();
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).output();
            let _ = Command::new("umount").arg("-l").arg(&self.copy).output();
        }
    }
}

pub fn setx(p: &Path, name: &str) -> std::io::Result<()> {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    // SAFETY: valid C strings, empty value.
    let r = unsafe { libc::setxattr(c.as_ptr(), n.as_ptr(), std::ptr::null(), 0, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

pub fn state(p: &Path) -> String {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let n = CString::new("user.pairfs.state").unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid C strings, buffer of the given length.
    let r = unsafe { libc::getxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(
        r >= 0,
        "getxattr state of {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
    buf.truncate(r as usize);
    String::from_utf8(buf).unwrap()
}

pub fn field(state: &str, key: &str) -> Option<u64> {
    state
        .split(' ')
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.trim_end_matches('%').parse().ok())
}

/// Waits until the pair's state word is `want`.
pub fn wait_state(p: &Path, want: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let s = state(p);
        if s.split(' ').next() == Some(want) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {want}: {s}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Deterministic block content.
pub fn block(id: u64, version: u64, len: usize) -> Vec<u8> {
    let mut x = id.wrapping_mul(0x9E3779B97F4A7C15) ^ version.wrapping_mul(0xD1B54A32D192ED03) | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// The whole content of file `p`.
pub fn read_all(p: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    std::io::Read::read_to_end(
        &mut std::fs::File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display())),
        &mut v,
    )
    .unwrap();
    v
}

/// Writes `len` bytes of [`block`] `b` at version `ver` at block `b` (64 KiB blocks) of
/// `p`, fsync'd.
pub fn put(p: &Path, b: u64, ver: u64, len: usize) {
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &block(b, ver, len), b * 64 * 1024).unwrap();
    f.sync_all().unwrap();
}

/// Makes `p` anew as `blocks` 64 KiB blocks at version `ver`.
pub fn make(p: &Path, blocks: u64, ver: u64) {
    std::fs::write(p, b"").unwrap();
    for b in 0..blocks {
        put(p, b, ver, 64 * 1024);
    }
}

/// Asserts `got == want`, naming the first differing byte rather than dumping both.
pub fn same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: size");
    if let Some(k) = (0..got.len()).find(|&k| got[k] != want[k]) {
        panic!("{what}: first difference at byte {k}");
    }
}

/// The `pair=` id in `p`'s state line.
pub fn pair_id(p: &Path) -> u64 {
    field(&state(p), "pair").expect("pair id")
}

/// `setfattr -n user.pairfs.OP p`, panicking on failure.
pub fn ctl(p: &Path, op: &str) {
    setx(p, &format!("user.pairfs.{op}")).unwrap_or_else(|e| panic!("{op} {}: {e}", p.display()));
}

/// Kills (-9) the daemon mounted on `img` (found by its command line), waits until it
/// is gone and lazily unmounts its dead `mounts`.
pub fn kill9_mount(img: &Path, mounts: &[&Path]) {
    let pat = format!(" mount {} ", img.display());
    let out = Command::new("pgrep").arg("-f").arg(&pat).output().unwrap();
    let pids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert!(!pids.is_empty(), "no daemon of {}", img.display());
    for p in &pids {
        let _ = Command::new("kill").args(["-9", p]).output();
    }
    let t = Instant::now();
    while pids
        .iter()
        .any(|p| Path::new(&format!("/proc/{p}")).exists())
        && t.elapsed() < Duration::from_secs(20)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    for m in mounts {
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg("-z")
            .arg(m)
            .output();
    }
}
