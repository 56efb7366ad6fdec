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

use std::io::Write as _;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

mod crashmodel;
use crashmodel::{
    Found, Model, PAGE, PairM, Rng, build, check_copy, check_main, create_file, daemon_pids,
    decode, env_seed, env_u64, force_unmount, fsck, get_state, mount_daemon, mounted, reap_daemons,
    run_pairfs, say, set_control, summarize, wait_dead, wait_unmounted, wait_word, word,
};

const MAGIC: &[u8; 8] = b"PFSKILL1";
const FILE: &str = "data.bin";

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

    fn mkfs(&self) {
        let (ok, text) = run_pairfs(&[
            "mkfs".as_ref(),
            self.vol.as_os_str(),
            "--size".as_ref(),
            "2G".as_ref(),
        ]);
        assert!(ok, "mkfs failed: {text}");
    }

    fn mount(&self, commit_ms: u64) {
        let st = mount_daemon(&self.vol, &self.mnt, &self.cmnt, commit_ms, &self.log);
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
        fsck(&self.vol)
    }

    fn umount_clean(&self) {
        let (ok, text) = run_pairfs(&["umount".as_ref(), self.mnt.as_os_str()]);
        assert!(ok, "pairfs umount failed: {text}\n{}", self.log_tail());
        wait_unmounted(&self.vol, &self.mnt, &self.cmnt);
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
        reap_daemons(&self.vol);
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
        wait_word(
            || {
                self.progress();
                self.state()
            },
            want,
            limit,
        )
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
        *self.sh.model() = Some(create_file(&self.env.file(), 0, pages, 256));
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
    let rounds = env_u64("PAIRFS_KILL_ROUNDS", 20);
    let seed = env_seed("PAIRFS_KILL_SEED");
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
