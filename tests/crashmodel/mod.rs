//! The page model shared by the crash tests (`kill.rs`, `powerloss.rs`): pages that tell
//! which write produced them, what the test knows about a file, the checks of a file and of
//! a frozen copy after a crash, and the helpers that drive pairfs mounts and daemons.
//!
//! The including test defines `const MAGIC: &[u8; 8]` at its root: the first bytes of
//! every page it writes.
#![allow(dead_code)]

use std::ffi::CString;
use std::io::Write as _;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::MAGIC;

pub const PAGE: usize = 4096;

/// The pairfs binary: `PAIRFS_BIN`, else the one cargo built for this test.
pub fn bin() -> PathBuf {
    std::env::var_os("PAIRFS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_pairfs")))
}

/// Writes straight to stderr, past the test harness's output capture, so the seed and the
/// summary are always visible.
pub fn say(s: &str) {
    let _ = writeln!(std::io::stderr(), "{s}");
}

/// `var` parsed as a number, else `default`.
pub fn env_u64(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// The seed: `var`, else from the clock.
pub fn env_seed(var: &str) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
}

// ---------------------------------------------------------------------------------------
// PRNG and page patterns

pub fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// xorshift64*.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(splitmix(seed) | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn chance(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }
    pub fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

/// The content of page `page` as written by write `id`.
pub fn fill_page(page: u64, id: u64, out: &mut [u8]) {
    debug_assert_eq!(out.len(), PAGE);
    out[0..8].copy_from_slice(MAGIC);
    out[8..16].copy_from_slice(&page.to_le_bytes());
    out[16..24].copy_from_slice(&id.to_le_bytes());
    let mut x = splitmix(page ^ id.rotate_left(29) ^ 0x5EED_F00D) | 1;
    for c in out[24..].chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        c.copy_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes()[..c.len()]);
    }
}

/// What a page read back holds.
#[derive(Debug, PartialEq)]
pub enum Found {
    /// Intact content of write `id`.
    Id(u64),
    /// All zeros.
    Zeros,
    /// The intact content of another page (a misplaced write).
    Misplaced { page: u64, id: u64 },
    /// Anything else (torn or foreign bytes).
    Garbage,
}

pub fn decode(page: u64, data: &[u8], scratch: &mut [u8]) -> Found {
    if data.len() != PAGE {
        return Found::Garbage;
    }
    if data.iter().all(|&b| b == 0) {
        return Found::Zeros;
    }
    if &data[0..8] != MAGIC {
        return Found::Garbage;
    }
    let p = u64::from_le_bytes(data[8..16].try_into().unwrap());
    let id = u64::from_le_bytes(data[16..24].try_into().unwrap());
    fill_page(p, id, scratch);
    if scratch != data {
        Found::Garbage
    } else if p != page {
        Found::Misplaced { page: p, id }
    } else {
        Found::Id(id)
    }
}

// ---------------------------------------------------------------------------------------
// Model of a file

/// What the test knows about one file. Write ids are `tag << 40 | n`, unique across files
/// of different tags, so a page of another file is recognized as misplaced.
pub struct Model {
    pub tag: u64,
    /// Write id of each page as of the last write.
    pub cur: Vec<u64>,
    /// Write id of each page as of the last fsync (or the last verified state).
    pub synced: Vec<u64>,
    /// Local write n covered pages `log[n].0 .. log[n].0 + log[n].1` (also failed writes:
    /// their data may or may not have landed).
    pub log: Vec<(u64, u64)>,
}

impl Model {
    pub fn new(tag: u64, pages: usize) -> Model {
        Model {
            tag,
            cur: vec![tag << 40; pages],
            synced: vec![tag << 40; pages],
            log: vec![(0, 0)],
        }
    }
    pub fn new_write(&mut self, first: u64, n: u64) -> u64 {
        self.log.push((first, n));
        self.tag << 40 | (self.log.len() - 1) as u64
    }
    pub fn covers(&self, id: u64, page: u64) -> bool {
        let local = id & ((1 << 40) - 1);
        id >> 40 == self.tag
            && self
                .log
                .get(local as usize)
                .is_some_and(|&(f, n)| local != 0 && page >= f && page < f + n)
    }
}

pub fn build(first: u64, n: u64, id: u64) -> Vec<u8> {
    let mut buf = vec![0u8; n as usize * PAGE];
    for (k, c) in buf.chunks_mut(PAGE).enumerate() {
        fill_page(first + k as u64, id, c);
    }
    buf
}

/// Creates `path` and writes it whole in runs of `chunk` pages, fsync'd; returns its model
/// (write ids tagged `tag`).
pub fn create_file(path: &Path, tag: u64, pages: usize, chunk: u64) -> Model {
    let mut m = Model::new(tag, pages);
    let f = std::fs::File::create(path).expect("create file");
    let mut p = 0u64;
    while (p as usize) < pages {
        let n = chunk.min(pages as u64 - p);
        let id = m.new_write(p, n);
        f.write_all_at(&build(p, n, id), p * PAGE as u64)
            .expect("initial write");
        for q in p..p + n {
            m.cur[q as usize] = id;
        }
        p += n;
    }
    f.sync_all().expect("fsync");
    m.synced.clone_from(&m.cur);
    m
}

/// Problems of the main file after a crash: each page must hold its fsync'd content or
/// that of a write issued after the fsync. Returns the ids found and the problems.
pub fn check_main(data: &[u8], m: &Model) -> (Vec<u64>, Vec<String>) {
    let pages = m.synced.len();
    let mut found = vec![0; pages];
    let mut probs = Vec::new();
    if data.len() != pages * PAGE {
        probs.push(format!(
            "main file is {} bytes, expected {}",
            data.len(),
            pages * PAGE
        ));
    }
    let mut scratch = vec![0u8; PAGE];
    for (p, &want) in m.synced.iter().enumerate() {
        let Some(d) = data.get(p * PAGE..(p + 1) * PAGE) else {
            probs.push(format!(
                "main page {p}: missing (file too short), fsync'd write {want}"
            ));
            continue;
        };
        match decode(p as u64, d, &mut scratch) {
            Found::Id(id) if id == want || (id > want && m.covers(id, p as u64)) => found[p] = id,
            f => probs.push(format!(
                "main page {p} (offset {}): found {f:?}, expected the fsync'd write {want} or a later write to it",
                p * PAGE
            )),
        }
    }
    (found, probs)
}

/// Problems of a frozen copy: it must equal `snap` exactly.
pub fn check_copy(data: &[u8], snap: &[u64], what: &str) -> Vec<String> {
    let mut probs = Vec::new();
    if data.len() != snap.len() * PAGE {
        probs.push(format!(
            "{what}: copy is {} bytes, expected {}",
            data.len(),
            snap.len() * PAGE
        ));
    }
    let mut scratch = vec![0u8; PAGE];
    for (p, &want) in snap.iter().enumerate() {
        let Some(d) = data.get(p * PAGE..(p + 1) * PAGE) else {
            break;
        };
        match decode(p as u64, d, &mut scratch) {
            Found::Id(id) if id == want => {}
            f => probs.push(format!(
                "{what}: copy page {p} (offset {}): found {f:?}, expected write {want}",
                p * PAGE
            )),
        }
    }
    probs
}

pub fn summarize(mut probs: Vec<String>) -> Vec<String> {
    if probs.len() > 8 {
        let n = probs.len();
        probs.truncate(8);
        probs.push(format!("... {} more bad pages", n - 8));
    }
    probs
}

/// Polls `state` until its first word is one of `want`; fails on `error` or after `limit`.
pub fn wait_word(
    mut state: impl FnMut() -> String,
    want: &[&str],
    limit: Duration,
) -> Result<String, String> {
    let t = Instant::now();
    loop {
        let s = state();
        if want.contains(&word(&s)) {
            return Ok(s);
        }
        if word(&s) == "error" {
            return Err(format!("pair in error while waiting for {want:?}: {s}"));
        }
        if t.elapsed() > limit {
            return Err(format!("still {s:?} after {limit:?}, waiting for {want:?}"));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// What the test expects of a pair.
#[derive(Clone)]
pub enum PairM {
    None,
    /// Paired, no frozen copy (forming, formed, resyncing).
    Paired,
    /// Frozen as of this snapshot (split or update returned).
    Frozen(Vec<u64>),
}

// ---------------------------------------------------------------------------------------
// Mounts, processes, xattrs

/// Runs `pairfs args`: (success, stdout and stderr).
pub fn run_pairfs(args: &[&std::ffi::OsStr]) -> (bool, String) {
    let out = Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run pairfs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `pairfs fsck vol`: its output, as the error if it failed.
pub fn fsck(vol: &Path) -> Result<String, String> {
    let (ok, text) = run_pairfs(&["fsck".as_ref(), vol.as_os_str()]);
    if ok { Ok(text) } else { Err(text) }
}

/// `pairfs mount vol mnt --copy-mount cmnt --commit-ms commit_ms --daemon`, its output
/// appended to `log`.
pub fn mount_daemon(
    vol: &Path,
    mnt: &Path,
    cmnt: &Path,
    commit_ms: u64,
    log: &Path,
) -> std::process::ExitStatus {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(bin())
        .arg("mount")
        .arg(vol)
        .arg(mnt)
        .arg("--copy-mount")
        .arg(cmnt)
        .arg("--commit-ms")
        .arg(commit_ms.to_string())
        .arg("--daemon")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .status()
        .expect("run pairfs mount")
}

/// After `pairfs umount`: waits up to 30 s for both mounts and the daemon to go.
pub fn wait_unmounted(vol: &Path, mnt: &Path, cmnt: &Path) {
    let t = Instant::now();
    while (mounted(mnt) || mounted(cmnt) || !daemon_pids(vol).is_empty())
        && t.elapsed() < Duration::from_secs(30)
    {
        thread::sleep(Duration::from_millis(20));
    }
}

/// Gives the daemon of `vol` 5 s to exit, then SIGKILLs what is left.
pub fn reap_daemons(vol: &Path) {
    let pids = daemon_pids(vol);
    if !wait_dead(&pids, Duration::from_secs(5)) {
        for &p in &pids {
            // SAFETY: kill on a pid of our own daemon.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
        wait_dead(&pids, Duration::from_secs(5));
    }
}

pub fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

pub fn set_control(path: &Path, op: &str) -> std::io::Result<()> {
    let name = CString::new(format!("user.pairfs.{op}")).unwrap();
    // SAFETY: valid C strings; an empty value.
    let r = unsafe { libc::setxattr(cpath(path).as_ptr(), name.as_ptr(), std::ptr::null(), 0, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

pub fn get_state(path: &Path) -> std::io::Result<String> {
    let name = CString::new("user.pairfs.state").unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid C strings and a buffer of the length passed.
    let n = unsafe {
        libc::getxattr(
            cpath(path).as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(String::from_utf8_lossy(&buf).trim().to_string())
}

pub fn word(s: &str) -> &str {
    s.split_whitespace().next().unwrap_or("")
}

/// Listed in our mount table (a dead FUSE mount still is; stat() on it fails).
pub fn mounted(p: &Path) -> bool {
    let Ok(s) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = p.to_string_lossy().replace(' ', "\\040");
    s.lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

/// Detaches a (possibly dead) mount: umount2(MNT_DETACH), else `fusermount3 -uz`.
pub fn force_unmount(p: &Path) {
    if !detach(p) {
        panic!("cannot unmount {}", p.display());
    }
}

/// Detaches a (possibly dead) mount; false if it is still there after 5 s.
pub fn detach(p: &Path) -> bool {
    for _ in 0..50 {
        if !mounted(p) {
            return true;
        }
        // SAFETY: valid C string.
        if unsafe { libc::umount2(cpath(p).as_ptr(), libc::MNT_DETACH) } != 0 {
            let _ = Command::new("fusermount3")
                .arg("-uz")
                .arg(p)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        if !mounted(p) {
            return true;
        }
        thread::sleep(Duration::from_millis(100));
    }
    false
}

/// Live processes with `vol` (unique to this test) as an argument: the daemon.
pub fn daemon_pids(vol: &Path) -> Vec<i32> {
    let me = std::process::id() as i32;
    let want = vol.as_os_str().as_bytes();
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        if cmd.split(|&b| b == 0).any(|a| a == want) && alive(pid) {
            out.push(pid);
        }
    }
    out
}

/// Exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(')')
            .is_some_and(|(_, r)| !r.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

pub fn wait_dead(pids: &[i32], limit: Duration) -> bool {
    let t = Instant::now();
    while pids.iter().any(|&p| alive(p)) {
        if t.elapsed() > limit {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
    true
}
