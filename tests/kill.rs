//! Kill -9 crash test (issue 4, "process kills"): a writer rewrites a file through a real
//! pairfs mount while the test splits, updates, resyncs and releases its pair, then kills
//! the daemon with SIGKILL at a random moment, force-unmounts the dead mounts, runs
//! `pairfs fsck`, remounts and checks that nothing was lost:
//!
//! - every frozen copy whose split or update had returned reads exactly the file content
//!   of that instant, byte for byte (also while the copy is still resuming after the
//!   remount, and once the pair is back in `split`);
//! - every byte of the main file that was fsync'd (`File::sync_all`) is there: each 4 KiB
//!   page holds either its content at the last fsync or the content of a later write;
//! - `pairfs fsck` exits 0 after every kill;
//! - pairs resume and finish (`splitting`/`updating` reach `split`, `forming`/`resyncing`
//!   reach `formed`); a resynced or released pair offers no frozen copy.
//!
//! Every 4 KiB page written carries a header (magic, page number, write id) followed by
//! pseudo-random bytes derived from both, so a page read back tells which write produced it
//! and whether it is intact.
//!
//! ```text
//! cargo test --release --test kill
//! ```
//!
//! The seed and the summary (`kill test: R rounds, K kills, L losses ...`) go straight to
//! stderr, past the harness's capture. A "loss" is any failed check: `DATA` losses are wrong
//! content of the file or of a frozen copy; the others are a pair in the wrong state after
//! the crash, a pair that does not finish, or an fsck failure.
//!
//! Environment: `PAIRFS_KILL_ROUNDS` (default 20), `PAIRFS_KILL_SEED` (default: from the
//! clock; the seed is printed; timing makes a rerun similar, not identical),
//! `PAIRFS_KILL_KEEP=1` keeps the temporary directory (volume, daemon log) for debugging,
//! `PAIRFS_BIN` runs another pairfs binary than the one cargo built.
//!
//! Needs /dev/fuse (root, or fusermount3 for a normal user); skips with a message without it.

use std::ffi::CString;
use std::io::Write as _;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// The pairfs binary: `PAIRFS_BIN`, else the one cargo built for this test.
fn bin() -> PathBuf {
    std::env::var_os("PAIRFS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_pairfs")))
}
const PAGE: usize = 4096;
const MAGIC: &[u8; 8] = b"PFSKILL1";
const FILE: &str = "data.bin";

/// Writes straight to stderr, past the test harness's output capture, so the seed and the
/// summary are always visible.
fn say(s: &str) {
    let _ = writeln!(std::io::stderr(), "{s}");
}

// ---------------------------------------------------------------------------------------
// PRNG and page patterns

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// xorshift64*.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(splitmix(seed) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }
    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

/// The content of page `page` as written by write `id`.
fn fill_page(page: u64, id: u64, out: &mut [u8]) {
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
enum Found {
    /// Intact content of write `id`.
    Id(u64),
    /// All zeros.
    Zeros,
    /// The intact content of another page (a misplaced write).
    Misplaced { page: u64, id: u64 },
    /// Anything else (torn or foreign bytes).
    Garbage,
}

fn decode(page: u64, data: &[u8], scratch: &mut [u8]) -> Found {
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
// Model of the file

/// What the test knows about the main file.
struct Model {
    /// Write id of each page as of the last successful write.
    cur: Vec<u64>,
    /// Write id of each page as of the last fsync (or the last verified state).
    synced: Vec<u64>,
    /// Write `id` covered pages `log[id].0 .. log[id].0 + log[id].1` (also failed writes:
    /// their data may or may not have landed).
    log: Vec<(u64, u64)>,
}

impl Model {
    fn new(pages: usize) -> Model {
        Model {
            cur: vec![0; pages],
            synced: vec![0; pages],
            log: vec![(0, 0)],
        }
    }
    fn new_write(&mut self, first: u64, n: u64) -> u64 {
        self.log.push((first, n));
        (self.log.len() - 1) as u64
    }
    fn covers(&self, id: u64, page: u64) -> bool {
        self.log
            .get(id as usize)
            .is_some_and(|&(f, n)| id != 0 && page >= f && page < f + n)
    }
}

fn build(first: u64, n: u64, id: u64) -> Vec<u8> {
    let mut buf = vec![0u8; n as usize * PAGE];
    for (k, c) in buf.chunks_mut(PAGE).enumerate() {
        fill_page(first + k as u64, id, c);
    }
    buf
}

/// Problems of the main file after a crash: each page must hold its fsync'd content or
/// that of a write issued after the fsync. Returns the ids found and the problems.
fn check_main(data: &[u8], m: &Model) -> (Vec<u64>, Vec<String>) {
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
fn check_copy(data: &[u8], snap: &[u64], what: &str) -> Vec<String> {
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

fn summarize(mut probs: Vec<String>) -> Vec<String> {
    if probs.len() > 8 {
        let n = probs.len();
        probs.truncate(8);
        probs.push(format!("... {} more bad pages", n - 8));
    }
    probs
}

// ---------------------------------------------------------------------------------------
// Mounts, processes, xattrs

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

fn set_control(path: &Path, op: &str) -> std::io::Result<()> {
    let name = CString::new(format!("user.pairfs.{op}")).unwrap();
    // SAFETY: valid C strings; an empty value.
    let r = unsafe { libc::setxattr(cpath(path).as_ptr(), name.as_ptr(), std::ptr::null(), 0, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn get_state(path: &Path) -> std::io::Result<String> {
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

fn word(s: &str) -> &str {
    s.split_whitespace().next().unwrap_or("")
}

/// Listed in our mount table (a dead FUSE mount still is; stat() on it fails).
fn mounted(p: &Path) -> bool {
    let Ok(s) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = p.to_string_lossy().replace(' ', "\\040");
    s.lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

/// Detaches a (possibly dead) mount: umount2(MNT_DETACH), else `fusermount3 -uz`.
fn force_unmount(p: &Path) {
    for _ in 0..50 {
        if !mounted(p) {
            return;
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
            return;
        }
        thread::sleep(Duration::from_millis(100));
    }
    panic!("cannot unmount {}", p.display());
}

/// Live processes with `vol` (unique to this test) as an argument: the daemon.
fn daemon_pids(vol: &Path) -> Vec<i32> {
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
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(')')
            .is_some_and(|(_, r)| !r.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn wait_dead(pids: &[i32], limit: Duration) -> bool {
    let t = Instant::now();
    while pids.iter().any(|&p| alive(p)) {
        if t.elapsed() > limit {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
    true
}

/// The test's volume, mounts and log; cleans up mounts and daemons on drop (also on panic).
struct Env {
    dir: Option<tempfile::TempDir>,
    vol: PathBuf,
    mnt: PathBuf,
    cmnt: PathBuf,
    log: PathBuf,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::Builder::new()
            .prefix("pairfs-kill.")
            .tempdir()
            .expect("tempdir");
        let root = dir.path().canonicalize().expect("canonicalize");
        let (mnt, cmnt) = (root.join("mnt"), root.join("copies"));
        std::fs::create_dir(&mnt).unwrap();
        std::fs::create_dir(&cmnt).unwrap();
        Env {
            vol: root.join("vol.img"),
            log: root.join("daemon.log"),
            mnt,
            cmnt,
            dir: Some(dir),
        }
    }

    fn file(&self) -> PathBuf {
        self.mnt.join(FILE)
    }

    fn copy_file(&self) -> PathBuf {
        self.cmnt.join(FILE)
    }

    fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    fn note(&self, s: &str) {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
        {
            let _ = writeln!(f, "==== kill test: {s}");
        }
    }

    fn run(&self, args: &[&std::ffi::OsStr]) -> (bool, String) {
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

    fn mkfs(&self) {
        let (ok, text) = self.run(&[
            "mkfs".as_ref(),
            self.vol.as_os_str(),
            "--size".as_ref(),
            "2G".as_ref(),
        ]);
        assert!(ok, "mkfs failed: {text}");
    }

    fn mount(&self, commit_ms: u64) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let st = Command::new(bin())
            .arg("mount")
            .arg(&self.vol)
            .arg(&self.mnt)
            .arg("--copy-mount")
            .arg(&self.cmnt)
            .arg("--commit-ms")
            .arg(commit_ms.to_string())
            .arg("--daemon")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .status()
            .expect("run pairfs mount");
        assert!(
            st.success(),
            "pairfs mount failed ({st}); daemon log:\n{}",
            self.log_tail()
        );
        assert!(
            mounted(&self.mnt) && mounted(&self.cmnt),
            "mount returned but is not in the mount table"
        );
    }

    /// SIGKILL the daemon; returns how many processes were killed.
    fn kill9(&self) -> usize {
        let pids = daemon_pids(&self.vol);
        for &p in &pids {
            // SAFETY: kill on a pid of our own daemon.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
        assert!(
            wait_dead(&pids, Duration::from_secs(20)),
            "daemon {pids:?} survived SIGKILL"
        );
        pids.len()
    }

    fn fsck(&self) -> Result<String, String> {
        let (ok, text) = self.run(&["fsck".as_ref(), self.vol.as_os_str()]);
        if ok { Ok(text) } else { Err(text) }
    }

    fn umount_clean(&self) {
        let (ok, text) = self.run(&["umount".as_ref(), self.mnt.as_os_str()]);
        assert!(ok, "pairfs umount failed: {text}\n{}", self.log_tail());
        let t = Instant::now();
        while (mounted(&self.mnt) || mounted(&self.cmnt) || !daemon_pids(&self.vol).is_empty())
            && t.elapsed() < Duration::from_secs(30)
        {
            thread::sleep(Duration::from_millis(20));
        }
        assert!(
            !mounted(&self.mnt) && !mounted(&self.cmnt),
            "mounts still there after pairfs umount"
        );
        assert!(
            daemon_pids(&self.vol).is_empty(),
            "daemon still running after pairfs umount"
        );
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // Detach the mounts (a live daemon then exits by itself), then make sure no daemon
        // of ours is left.
        force_unmount(&self.mnt);
        force_unmount(&self.cmnt);
        let pids = daemon_pids(&self.vol);
        if !wait_dead(&pids, Duration::from_secs(5)) {
            for &p in &pids {
                // SAFETY: kill on a pid of our own daemon.
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
            wait_dead(&pids, Duration::from_secs(5));
        }
        if std::env::var_os("PAIRFS_KILL_KEEP").is_some_and(|v| v == "1")
            && let Some(d) = self.dir.take()
        {
            say(&format!("kill test: kept {}", d.keep().display()));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Writer and copy reader threads

#[derive(Default)]
struct Shared {
    model: Mutex<Option<Model>>,
    pause: AtomicBool,
    stop: AtomicBool,
    killed: AtomicBool,
    writes: AtomicU64,
    bytes: AtomicU64,
    fsyncs: AtomicU64,
    reads: AtomicU64,
}

impl Shared {
    fn model(&self) -> std::sync::MutexGuard<'_, Option<Model>> {
        self.model.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Rewrites random page runs (a 64 KiB track-aligned block half of the time, else 1-32
/// pages anywhere), fsyncs now and then. Returns an error text if an I/O failed before
/// the daemon was killed.
fn writer(sh: Arc<Shared>, path: PathBuf, seed: u64) -> Option<String> {
    let mut rng = Rng::new(seed);
    let f = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) => {
            return (!sh.killed.load(Ordering::SeqCst))
                .then(|| format!("open {}: {e}", path.display()));
        }
    };
    loop {
        while sh.pause.load(Ordering::SeqCst) && !sh.stop.load(Ordering::SeqCst) {
            thread::sleep(Duration::from_micros(200));
        }
        if sh.stop.load(Ordering::SeqCst) {
            return None;
        }
        let mut g = sh.model();
        let m = g.as_mut().expect("model");
        let pages = m.cur.len() as u64;
        let (first, n) = if rng.chance(50) {
            let b = rng.below(pages / 16) * 16;
            (b, 16.min(pages - b))
        } else {
            let p = rng.below(pages);
            (p, (1 + rng.below(32)).min(pages - p))
        };
        let id = m.new_write(first, n);
        let buf = build(first, n, id);
        if let Err(e) = f.write_all_at(&buf, first * PAGE as u64) {
            return (!sh.killed.load(Ordering::SeqCst))
                .then(|| format!("write of {n} pages at page {first}: {e}"));
        }
        for p in first..first + n {
            m.cur[p as usize] = id;
        }
        sh.writes.fetch_add(1, Ordering::Relaxed);
        sh.bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
        if rng.chance(4) {
            if let Err(e) = f.sync_all() {
                return (!sh.killed.load(Ordering::SeqCst)).then(|| format!("fsync: {e}"));
            }
            m.synced.clone_from(&m.cur);
            sh.fsyncs.fetch_add(1, Ordering::Relaxed);
        }
        drop(g);
        if rng.chance(10) {
            thread::sleep(Duration::from_millis(rng.below(3)));
        }
    }
}

/// Reads random 1 MiB windows of the frozen copy while the writer runs and checks them
/// against `snap`. Returns (I/O error before the kill, content problems).
fn copy_reader(
    sh: Arc<Shared>,
    path: PathBuf,
    snap: Vec<u64>,
    seed: u64,
) -> (Option<String>, Vec<String>) {
    let mut rng = Rng::new(seed);
    let f = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) => {
            return (
                (!sh.killed.load(Ordering::SeqCst))
                    .then(|| format!("open {}: {e}", path.display())),
                vec![],
            );
        }
    };
    let pages = snap.len() as u64;
    let mut scratch = vec![0u8; PAGE];
    let mut probs = Vec::new();
    while !sh.stop.load(Ordering::SeqCst) && probs.is_empty() {
        let first = rng.below(pages);
        let n = 256.min(pages - first);
        let mut buf = vec![0u8; (n as usize) * PAGE];
        if let Err(e) = f.read_exact_at(&mut buf, first * PAGE as u64) {
            return (
                (!sh.killed.load(Ordering::SeqCst))
                    .then(|| format!("read of the copy at page {first}: {e}")),
                probs,
            );
        }
        if sh.killed.load(Ordering::SeqCst) {
            // The read may have been answered by a dying daemon: do not judge it.
            break;
        }
        for k in 0..n {
            let p = first + k;
            let d = &buf[(k as usize) * PAGE..(k as usize + 1) * PAGE];
            match decode(p, d, &mut scratch) {
                Found::Id(id) if id == snap[p as usize] => {}
                f => probs.push(format!(
                    "live read of the copy, page {p}: found {f:?}, expected write {}",
                    snap[p as usize]
                )),
            }
        }
        sh.reads.fetch_add(1, Ordering::Relaxed);
    }
    (None, probs)
}

// ---------------------------------------------------------------------------------------
// The test

/// What the test expects of the pair.
#[derive(Clone)]
enum PairM {
    None,
    /// Paired, no frozen copy (forming, formed, resyncing).
    Paired,
    /// Frozen as of this snapshot (split or update returned).
    Frozen(Vec<u64>),
}

#[derive(Default)]
struct Counts {
    kills: u64,
    splits: u64,
    updates: u64,
    resyncs: u64,
    pairs: u64,
    releases: u64,
    copy_checks: u64,
    main_checks: u64,
    fscks: u64,
    live_readers: u64,
    killed_in: std::collections::BTreeMap<String, u64>,
    max_split_latency: Duration,
}

struct Test {
    env: Env,
    /// Seconds since `t0` at the last sign of progress (for the watchdog).
    beat: Arc<AtomicU64>,
    t0: Instant,
    sh: Arc<Shared>,
    rng: Rng,
    pair: PairM,
    c: Counts,
    losses: Vec<String>,
    /// How many of `losses` lost data (file content, a frozen copy); the others are
    /// lost or wrong pair state, stuck pairs and fsck failures.
    data_losses: usize,
    round: u64,
}

impl Drop for Test {
    fn drop(&mut self) {
        // On a panic, stop the writer and reader threads before the mounts go.
        self.sh.stop.store(true, Ordering::SeqCst);
        self.sh.pause.store(false, Ordering::SeqCst);
    }
}

/// If no round makes progress for `limit`, kills the daemon so that whatever FUSE call
/// hangs fails (ENOTCONN) and the test ends with an error instead of hanging.
fn watchdog(beat: Arc<AtomicU64>, done: Arc<AtomicBool>, t0: Instant, vol: PathBuf, limit: u64) {
    while !done.load(Ordering::SeqCst) {
        thread::sleep(Duration::from_millis(500));
        let now = t0.elapsed().as_secs();
        if now.saturating_sub(beat.load(Ordering::SeqCst)) > limit {
            say(&format!(
                "kill test: WATCHDOG: no progress for {limit} s; killing the daemon of {}",
                vol.display()
            ));
            for p in daemon_pids(&vol) {
                // SAFETY: kill on a pid of our own daemon.
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
            beat.store(now, Ordering::SeqCst);
        }
    }
}

impl Test {
    fn progress(&self) {
        self.beat
            .store(self.t0.elapsed().as_secs(), Ordering::SeqCst);
    }

    /// Records a loss of data.
    fn lose(&mut self, what: String) {
        self.data_losses += 1;
        self.fail(format!("DATA: {what}"));
    }

    /// Records a failed check.
    fn fail(&mut self, what: String) {
        say(&format!("kill test: round {}: LOSS: {what}", self.round));
        self.env
            .note(&format!("round {}: LOSS: {what}", self.round));
        self.losses.push(format!("round {}: {what}", self.round));
    }

    fn state(&self) -> String {
        get_state(&self.env.file())
            .unwrap_or_else(|e| panic!("getxattr user.pairfs.state: {e}\n{}", self.env.log_tail()))
    }

    /// Polls the state until its first word is one of `want`.
    fn wait_state(&self, want: &[&str], limit: Duration) -> Result<String, String> {
        let t = Instant::now();
        loop {
            self.progress();
            let s = self.state();
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

    fn read_copy(&self) -> Result<Vec<u8>, std::io::Error> {
        std::fs::read(self.env.copy_file())
    }

    /// Runs a control op with the writer paused: the snapshot of the model taken with no
    /// write in flight is the instant of the op.
    fn control(&mut self, op: &str) -> Vec<u64> {
        self.sh.pause.store(true, Ordering::SeqCst);
        let g = self.sh.model();
        let snap = g.as_ref().expect("model").cur.clone();
        let t = Instant::now();
        let r = set_control(&self.env.file(), op);
        let dt = t.elapsed();
        drop(g);
        self.sh.pause.store(false, Ordering::SeqCst);
        if let Err(e) = r {
            let st = get_state(&self.env.file()).unwrap_or_default();
            panic!(
                "setfattr user.pairfs.{op} failed: {e} (state {st})\n{}",
                self.env.log_tail()
            );
        }
        if op == "split" || op == "update" {
            self.c.max_split_latency = self.c.max_split_latency.max(dt);
        }
        self.env
            .note(&format!("round {}: {op} returned after {dt:?}", self.round));
        let st = self.state();
        let ok: &[&str] = match op {
            "split" => &["splitting", "split"],
            "update" => &["updating", "split"],
            "resync" => &["resyncing", "formed"],
            "pair" => &["forming", "formed"],
            _ => &["none"],
        };
        assert!(
            ok.contains(&word(&st)),
            "after {op}: state {st:?}, expected one of {ok:?}"
        );
        snap
    }

    /// After a failed state check, carries on from the state pairfs reports: a pair in a
    /// frozen or error state whose instant the test does not know is released.
    fn adopt(&mut self, st: &str) {
        self.pair = match word(st) {
            "none" => PairM::None,
            "forming" | "formed" | "resyncing" => PairM::Paired,
            _ => {
                if let Err(e) = set_control(&self.env.file(), "release") {
                    panic!("release of the unexpected pair ({st}) failed: {e}");
                }
                PairM::None
            }
        };
    }

    /// After a remount: the main file and the pair as expected.
    fn verify(&mut self) {
        // Main file: fsync'd data must be there.
        let data = std::fs::read(self.env.file()).unwrap_or_else(|e| panic!("read main file: {e}"));
        let (found, probs) = {
            let g = self.sh.model();
            check_main(&data, g.as_ref().expect("model"))
        };
        self.c.main_checks += 1;
        for p in summarize(probs) {
            self.lose(p);
        }
        {
            let mut g = self.sh.model();
            let m = g.as_mut().expect("model");
            m.cur.clone_from(&found);
            m.synced = found;
        }
        let st = self.state();
        match self.pair.clone() {
            PairM::Frozen(snap) => {
                if !["splitting", "split", "updating"].contains(&word(&st)) {
                    self.lose(format!(
                        "after the kill the pair is {st:?}; its frozen copy is gone"
                    ));
                    self.adopt(&st);
                    return;
                }
                if word(&st) != "split" {
                    // The copy must read right while the copier is still resuming.
                    match self.read_copy() {
                        Ok(d) => {
                            self.c.copy_checks += 1;
                            for p in summarize(check_copy(
                                &d,
                                &snap,
                                &format!("resuming ({})", word(&st)),
                            )) {
                                self.lose(p);
                            }
                        }
                        Err(e) => self.lose(format!("reading the copy while {}: {e}", word(&st))),
                    }
                }
                if let Err(e) = self.wait_state(&["split"], Duration::from_secs(120)) {
                    self.fail(e);
                    return;
                }
                match self.read_copy() {
                    Ok(d) => {
                        self.c.copy_checks += 1;
                        for p in summarize(check_copy(&d, &snap, "split")) {
                            self.lose(p);
                        }
                    }
                    Err(e) => self.lose(format!("reading the copy: {e}")),
                }
            }
            PairM::Paired => {
                if !["forming", "formed", "resyncing"].contains(&word(&st)) {
                    self.fail(format!(
                        "after the kill the pair is {st:?}, expected forming/formed/resyncing"
                    ));
                    self.adopt(&st);
                    return;
                }
                if self.env.copy_file().exists() {
                    self.fail("a resynced or unsplit pair still offers a frozen copy".into());
                }
                if let Err(e) = self.wait_state(&["formed"], Duration::from_secs(120)) {
                    self.fail(e);
                }
            }
            PairM::None => {
                if word(&st) != "none" {
                    self.fail(format!("after the kill the released pair is back: {st:?}"));
                    self.adopt(&st);
                    return;
                }
                if self.env.copy_file().exists() {
                    self.fail("a released pair still offers a frozen copy".into());
                }
            }
        }
    }

    /// Creates the file and writes it whole, fsync'd.
    fn create_file(&mut self, pages: usize) {
        let f = std::fs::File::create(self.env.file()).expect("create file");
        let mut m = Model::new(pages);
        let chunk = 256u64;
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
        *self.sh.model() = Some(m);
    }

    fn round(&mut self, seed: u64, kill: bool) {
        self.progress();
        let commit_ms = [5, 100, 1000][self.rng.below(3) as usize];
        self.env.note(&format!(
            "round {} mount (commit_ms {commit_ms})",
            self.round
        ));
        self.env.mount(commit_ms);
        if self.sh.model().is_none() {
            let pages = (32 << 20) / PAGE + self.rng.below(((32 << 20) / PAGE) as u64) as usize;
            say(&format!(
                "kill test: file of {} bytes ({pages} pages)",
                pages * PAGE
            ));
            self.create_file(pages);
        } else {
            self.verify();
        }
        if !kill {
            return;
        }
        // Writer on, a few control operations at random moments, a kill.
        self.sh.stop.store(false, Ordering::SeqCst);
        self.sh.killed.store(false, Ordering::SeqCst);
        self.sh.pause.store(false, Ordering::SeqCst);
        let w = {
            let (sh, path, s) = (
                self.sh.clone(),
                self.env.file(),
                seed ^ self.round.wrapping_mul(0x1234_5678_9ABC),
            );
            thread::spawn(move || writer(sh, path, s))
        };
        let nops = 1 + self.rng.below(3);
        for _ in 0..nops {
            thread::sleep(self.rng.ms(0, 300));
            match self.pair.clone() {
                PairM::None => {
                    if self.rng.chance(70) {
                        self.pair = PairM::Frozen(self.control("split"));
                        self.c.splits += 1;
                    } else {
                        self.control("pair");
                        self.pair = PairM::Paired;
                        self.c.pairs += 1;
                    }
                }
                PairM::Paired => {
                    if let Err(e) =
                        self.wait_state(&["forming", "formed"], Duration::from_secs(120))
                    {
                        panic!("{e}\n{}", self.env.log_tail());
                    }
                    self.pair = PairM::Frozen(self.control("split"));
                    self.c.splits += 1;
                }
                PairM::Frozen(_) => {
                    let r = self.rng.below(100);
                    if r < 75
                        && let Err(e) = self.wait_state(&["split"], Duration::from_secs(120))
                    {
                        panic!("{e}\n{}", self.env.log_tail());
                    }
                    if r < 45 {
                        self.pair = PairM::Frozen(self.control("update"));
                        self.c.updates += 1;
                    } else if r < 65 {
                        self.control("resync");
                        self.pair = PairM::Paired;
                        self.c.resyncs += 1;
                    } else if r < 75 {
                        self.control("release");
                        self.pair = PairM::None;
                        self.c.releases += 1;
                    }
                }
            }
        }
        let reader = match &self.pair {
            PairM::Frozen(snap) if self.rng.chance(50) => {
                self.c.live_readers += 1;
                let (sh, path, snap, s) = (
                    self.sh.clone(),
                    self.env.copy_file(),
                    snap.clone(),
                    seed ^ self.round,
                );
                Some(thread::spawn(move || copy_reader(sh, path, snap, s)))
            }
            _ => None,
        };
        // Often soon after the last operation, to land while the copier is still busy
        // (splitting, updating, resyncing), else later.
        let delay = match self.rng.below(20) {
            0..=6 => self.rng.ms(0, 15),
            7..=11 => self.rng.ms(40, 300),
            12..=15 => self.rng.ms(300, 1000),
            _ => self.rng.ms(1000, 2000),
        };
        thread::sleep(delay);
        let st = get_state(&self.env.file())
            .map(|s| word(&s).to_string())
            .unwrap_or_else(|e| format!("?{e}"));
        self.env.note(&format!(
            "round {}: kill -9 (state {st}) after {delay:?}",
            self.round
        ));
        self.sh.killed.store(true, Ordering::SeqCst);
        let n = self.env.kill9();
        assert!(
            n > 0,
            "no daemon process found for {}",
            self.env.vol.display()
        );
        self.c.kills += 1;
        *self.c.killed_in.entry(st).or_default() += 1;
        self.sh.stop.store(true, Ordering::SeqCst);
        if let Some(e) = w.join().expect("writer thread") {
            panic!(
                "the writer failed before the kill: {e}\n{}",
                self.env.log_tail()
            );
        }
        if let Some(r) = reader {
            let (err, probs) = r.join().expect("reader thread");
            if let Some(e) = err {
                panic!(
                    "the copy reader failed before the kill: {e}\n{}",
                    self.env.log_tail()
                );
            }
            for p in summarize(probs) {
                self.lose(p);
            }
        }
        force_unmount(&self.env.mnt);
        force_unmount(&self.env.cmnt);
        self.c.fscks += 1;
        if let Err(text) = self.env.fsck() {
            self.fail(format!("pairfs fsck after the kill failed:\n{text}"));
        }
    }
}

#[test]
fn kill9_under_writes() {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .is_err()
    {
        say("kill test: SKIPPED: /dev/fuse is not usable here");
        return;
    }
    let rounds: u64 = std::env::var("PAIRFS_KILL_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("PAIRFS_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    say(&format!(
        "kill test: seed {seed} (rerun with PAIRFS_KILL_SEED={seed}), {rounds} rounds"
    ));
    let t0 = Instant::now();
    let env = Env::new();
    env.mkfs();
    let beat = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let wd = {
        let (b, d, v) = (beat.clone(), done.clone(), env.vol.clone());
        thread::spawn(move || watchdog(b, d, t0, v, 300))
    };
    let mut t = Test {
        env,
        beat,
        t0,
        sh: Arc::new(Shared::default()),
        rng: Rng::new(seed),
        pair: PairM::None,
        c: Counts::default(),
        losses: Vec::new(),
        data_losses: 0,
        round: 0,
    };
    for r in 0..rounds {
        t.round = r;
        t.round(seed, true);
    }
    // A last mount: everything checked once more, then a clean unmount and fsck.
    t.round = rounds;
    t.round(seed, false);
    t.env.umount_clean();
    t.c.fscks += 1;
    if let Err(text) = t.env.fsck() {
        t.fail(format!(
            "pairfs fsck after the clean unmount failed:\n{text}"
        ));
    }
    done.store(true, Ordering::SeqCst);
    let _ = wd.join();
    let c = &t.c;
    say(&format!(
        "kill test: seed {seed}: {} writes ({} MiB), {} fsyncs, {} splits, {} updates, {} resyncs, {} pairs, {} releases, \
         {} copy checks, {} main-file checks, {} fscks, {} live copy readers ({} reads); kills by state {:?}; \
         slowest split/update {:?}; {:.1} s",
        t.sh.writes.load(Ordering::Relaxed),
        t.sh.bytes.load(Ordering::Relaxed) >> 20,
        t.sh.fsyncs.load(Ordering::Relaxed),
        c.splits,
        c.updates,
        c.resyncs,
        c.pairs,
        c.releases,
        c.copy_checks,
        c.main_checks,
        c.fscks,
        c.live_readers,
        t.sh.reads.load(Ordering::Relaxed),
        c.killed_in,
        c.max_split_latency,
        t0.elapsed().as_secs_f64()
    ));
    say(&format!(
        "kill test: {rounds} rounds, {} kills, {} losses ({} of data, {} of pair state or fsck)",
        c.kills,
        t.losses.len(),
        t.data_losses,
        t.losses.len() - t.data_losses
    ));
    assert!(
        t.losses.is_empty(),
        "seed {seed}: {} losses:\n{}",
        t.losses.len(),
        t.losses.join("\n")
    );
}
