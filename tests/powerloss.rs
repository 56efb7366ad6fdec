//! Power-loss test (issue 4): pairfs runs on top of `lazyfs` (examples/lazyfs.rs), a FUSE
//! layer that keeps every write not yet fsync'd in memory and, on SIGUSR1, keeps only a
//! random subset of them. The volume image, the copy image and the SQLite metadata database
//! with its `-wal` and `-shm` all live on it, so a "power loss" hits all of them at once.
//!
//! Each round mounts pairfs (`L/vol` on M, copies on C), checks what survived the previous
//! crash, runs a workload (random page writes to 2-3 files, fsyncs, pair / split / update /
//! resync / release through `setfattr user.pairfs.*`), then: kill -9 of the daemon, lazy
//! unmount of M and C, power loss in lazyfs, lazyfs restarted on the same backing directory,
//! `pairfs fsck` (must exit 0). The checks after the remount:
//!
//! - every frozen copy whose split or update had returned reads exactly the file content of
//!   that instant (read once right after the mount, and again once the pair is `split`);
//! - every page fsync'd (`File::sync_all`) holds its content at the last fsync or that of
//!   a later write to it;
//! - pairs resume and finish; a resynced or released pair offers no frozen copy.
//!
//! ```text
//! cargo build --release --examples && cargo test --release --test powerloss
//! ```
//!
//! Environment: `PAIRFS_POWERLOSS_ROUNDS` (default 40), `PAIRFS_POWERLOSS_SEED` (default:
//! the clock; printed; lazyfs's seed for round r is derived from it, timing makes a rerun
//! similar, not identical), `PAIRFS_POWERLOSS_KEEP=1` keeps the directory under /var/tmp
//! (backing files, daemon and lazyfs logs), `LAZYFS_BIN` / `PAIRFS_BIN` other binaries.
//!
//! Needs /dev/fuse as root; skips with a message otherwise.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

mod crashmodel;
use crashmodel::{
    Model, PAGE, PairM, Rng, build, check_copy, check_main, create_file, daemon_pids, detach,
    env_seed, env_u64, force_unmount, fsck, get_state, mount_daemon, mounted, reap_daemons,
    run_pairfs, say, set_control, splitmix, summarize, wait_dead, wait_unmounted, wait_word, word,
};

/// target/<profile>/examples/lazyfs, beside the pairfs binary cargo built (`cargo test`
/// builds the examples too).
fn lazyfs_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("LAZYFS_BIN") {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_BIN_EXE_pairfs"))
        .parent()
        .unwrap()
        .join("examples/lazyfs");
    if !p.exists() {
        // `cargo test --test powerloss` alone may not have built it.
        let release = p.to_string_lossy().contains("/release/");
        let mut c = Command::new(env!("CARGO"));
        c.args(["build", "--example", "lazyfs"])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if release {
            c.arg("--release");
        }
        let st = c.status().expect("cargo build --example lazyfs");
        assert!(st.success(), "cargo build --example lazyfs failed");
    }
    p
}

const MAGIC: &[u8; 8] = b"PFSPWRL1";

// ---------------------------------------------------------------------------------------
// The environment: backing directory on real disk, lazyfs, pairfs mounts

struct Env {
    dir: Option<tempfile::TempDir>,
    /// lazyfs's backing directory (real disk).
    back: PathBuf,
    /// lazyfs's mountpoint; the volume is `lazy/vol`.
    lazy: PathBuf,
    vol: PathBuf,
    mnt: PathBuf,
    cmnt: PathBuf,
    log: PathBuf,
    lazy_log: PathBuf,
    lazyfs: Option<Child>,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::Builder::new()
            .prefix("pairfs-powerloss.")
            .tempdir_in("/var/tmp")
            .expect("tempdir in /var/tmp");
        let root = dir.path().canonicalize().expect("canonicalize");
        let d = |n: &str| {
            let p = root.join(n);
            std::fs::create_dir(&p).unwrap();
            p
        };
        let (back, lazy, mnt, cmnt) = (d("backing"), d("lazy"), d("mnt"), d("copies"));
        Env {
            vol: lazy.join("vol"),
            back,
            lazy,
            mnt,
            cmnt,
            log: root.join("daemon.log"),
            lazy_log: root.join("lazyfs.log"),
            lazyfs: None,
            dir: Some(dir),
        }
    }

    fn note(&self, s: &str) {
        for l in [&self.log, &self.lazy_log] {
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(l)
            {
                let _ = writeln!(f, "==== powerloss test: {s}");
            }
        }
    }

    fn tail(p: &Path, n: usize) -> String {
        let s = std::fs::read_to_string(p).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    fn log_tail(&self) -> String {
        format!(
            "daemon log:\n{}\nlazyfs log:\n{}",
            Self::tail(&self.log, 30),
            Self::tail(&self.lazy_log, 6)
        )
    }

    fn start_lazyfs(&mut self, seed: u64) {
        assert!(self.lazyfs.is_none());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.lazy_log)
            .unwrap();
        // A concurrent cargo build may be replacing the binary: retry a missing one briefly.
        let mut tries = 0;
        let child = loop {
            match Command::new(lazyfs_bin())
                .arg(&self.back)
                .arg(&self.lazy)
                .env("LAZYFS_SEED", seed.to_string())
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log.try_clone().unwrap())
                .spawn()
            {
                Ok(c) => break c,
                Err(e) if tries < 50 && e.kind() == std::io::ErrorKind::NotFound => {
                    tries += 1;
                    thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("start {}: {e}", lazyfs_bin().display()),
            }
        };
        self.lazyfs = Some(child);
        let t = Instant::now();
        while !mounted(&self.lazy) {
            if let Some(st) = self.lazyfs.as_mut().unwrap().try_wait().unwrap() {
                panic!("lazyfs exited ({st}):\n{}", Self::tail(&self.lazy_log, 20));
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "lazyfs does not mount"
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Power loss: lazyfs keeps a random subset of the unsynced writes and exits.
    fn power_loss(&mut self) {
        let mut c = self.lazyfs.take().expect("lazyfs running");
        // SAFETY: our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGUSR1) };
        let t = Instant::now();
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                assert!(st.success(), "lazyfs power loss: exit {st}");
                break;
            }
            if t.elapsed() > Duration::from_secs(60) {
                let _ = c.kill();
                let _ = c.wait();
                panic!("lazyfs did not exit after SIGUSR1");
            }
            thread::sleep(Duration::from_millis(10));
        }
        force_unmount(&self.lazy);
    }

    fn mkfs(&self) {
        let (ok, text) = run_pairfs(&[
            "mkfs".as_ref(),
            self.vol.as_os_str(),
            "--size".as_ref(),
            "256M".as_ref(),
            "--track-size".as_ref(),
            "4K".as_ref(),
        ]);
        assert!(ok, "mkfs failed: {text}");
    }

    fn fsck(&self) -> Result<String, String> {
        fsck(&self.vol)
    }

    fn mount(&self, commit_ms: u64) -> Result<(), String> {
        let st = mount_daemon(&self.vol, &self.mnt, &self.cmnt, commit_ms, &self.log);
        if !st.success() {
            return Err(format!("pairfs mount failed ({st})\n{}", self.log_tail()));
        }
        if !(mounted(&self.mnt) && mounted(&self.cmnt)) {
            return Err("mount returned but is not in the mount table".into());
        }
        Ok(())
    }

    fn umount_clean(&self) {
        let (ok, text) = run_pairfs(&["umount".as_ref(), self.mnt.as_os_str()]);
        assert!(ok, "pairfs umount failed: {text}\n{}", self.log_tail());
        wait_unmounted(&self.vol, &self.mnt, &self.cmnt);
        assert!(
            !mounted(&self.mnt) && !mounted(&self.cmnt) && daemon_pids(&self.vol).is_empty(),
            "mounts or daemon still there after pairfs umount"
        );
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        detach(&self.mnt);
        detach(&self.cmnt);
        reap_daemons(&self.vol);
        if let Some(mut c) = self.lazyfs.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let lazy_gone = detach(&self.lazy);
        if (std::env::var_os("PAIRFS_POWERLOSS_KEEP").is_some_and(|v| v == "1") || !lazy_gone)
            && let Some(d) = self.dir.take()
        {
            // Never delete a directory still under a mount.
            say(&format!("power-loss test: kept {}", d.keep().display()));
        }
    }
}

// ---------------------------------------------------------------------------------------
// The test

struct F {
    name: String,
    m: Model,
    pair: PairM,
}

#[derive(Default)]
struct Counts {
    crashes: u64,
    writes: u64,
    fsyncs: u64,
    ops: BTreeMap<&'static str, u64>,
    copy_checks: u64,
    main_checks: u64,
    fscks: u64,
    crashed_in: BTreeMap<String, u64>,
}

struct Test {
    env: Env,
    rng: Rng,
    files: Vec<F>,
    c: Counts,
    losses: Vec<String>,
    round: u64,
}

impl Test {
    fn fail(&mut self, what: String) {
        say(&format!(
            "power-loss test: round {}: LOSS: {what}",
            self.round
        ));
        self.env
            .note(&format!("round {}: LOSS: {what}", self.round));
        self.losses.push(format!("round {}: {what}", self.round));
    }

    fn path(&self, i: usize) -> PathBuf {
        self.env.mnt.join(&self.files[i].name)
    }

    fn copy_path(&self, i: usize) -> PathBuf {
        self.env.cmnt.join(&self.files[i].name)
    }

    fn state(&self, i: usize) -> String {
        get_state(&self.path(i))
            .unwrap_or_else(|e| panic!("getxattr user.pairfs.state: {e}\n{}", self.env.log_tail()))
    }

    fn wait_state(&self, i: usize, want: &[&str], limit: Duration) -> Result<String, String> {
        wait_word(|| self.state(i), want, limit)
    }

    /// A control op (writes are sequential here, so none is in flight): returns the content
    /// of the file at that instant.
    fn control(&mut self, i: usize, op: &'static str) -> Vec<u64> {
        let snap = self.files[i].m.cur.clone();
        if let Err(e) = set_control(&self.path(i), op) {
            let st = get_state(&self.path(i)).unwrap_or_default();
            panic!(
                "setfattr user.pairfs.{op} failed: {e} (state {st})\n{}",
                self.env.log_tail()
            );
        }
        *self.c.ops.entry(op).or_default() += 1;
        self.env.note(&format!(
            "round {}: {} {op} returned",
            self.round, self.files[i].name
        ));
        snap
    }

    fn write(&mut self, i: usize) -> std::io::Result<()> {
        let path = self.path(i);
        let m = &mut self.files[i].m;
        let pages = m.cur.len() as u64;
        let (first, n) = if self.rng.chance(50) {
            let b = self.rng.below(pages / 16) * 16;
            (b, 16.min(pages - b))
        } else {
            let p = self.rng.below(pages);
            (p, (1 + self.rng.below(32)).min(pages - p))
        };
        let id = m.new_write(first, n);
        let f = std::fs::OpenOptions::new().write(true).open(&path)?;
        f.write_all_at(&build(first, n, id), first * PAGE as u64)?;
        for p in first..first + n {
            m.cur[p as usize] = id;
        }
        self.c.writes += 1;
        if self.rng.chance(10) {
            f.sync_all()?;
            m.synced.clone_from(&m.cur);
            self.c.fsyncs += 1;
        }
        Ok(())
    }

    fn create_files(&mut self) {
        let nf = 2 + self.rng.below(2) as usize;
        for k in 0..nf {
            let pages = 256 + self.rng.below(768) as usize;
            let name = format!("f{k}.bin");
            let path = self.env.mnt.join(&name);
            let m = create_file(&path, k as u64 + 1, pages, 128);
            self.files.push(F {
                name,
                m,
                pair: PairM::None,
            });
        }
        say(&format!(
            "power-loss test: files {:?}",
            self.files
                .iter()
                .map(|f| (f.name.clone(), f.m.cur.len() * PAGE))
                .collect::<Vec<_>>()
        ));
    }

    fn check_frozen(&mut self, i: usize, snap: &[u64], what: &str) {
        match std::fs::read(self.copy_path(i)) {
            Ok(d) => {
                self.c.copy_checks += 1;
                let name = self.files[i].name.clone();
                for p in summarize(check_copy(&d, snap, &format!("{name} {what}"))) {
                    self.fail(format!("DATA: {p}"));
                }
            }
            Err(e) => self.fail(format!(
                "DATA: reading the frozen copy of {} ({what}): {e}",
                self.files[i].name
            )),
        }
    }

    /// After a power loss and remount: files and pairs as expected.
    fn verify(&mut self) {
        for i in 0..self.files.len() {
            let name = self.files[i].name.clone();
            match std::fs::read(self.path(i)) {
                Ok(data) => {
                    let (found, probs) = check_main(&data, &self.files[i].m);
                    self.c.main_checks += 1;
                    for p in summarize(probs) {
                        self.fail(format!("DATA: {name}: {p}"));
                    }
                    let m = &mut self.files[i].m;
                    m.cur.clone_from(&found);
                    m.synced = found;
                }
                Err(e) => self.fail(format!("DATA: read {name}: {e}")),
            }
            let st = self.state(i);
            match self.files[i].pair.clone() {
                PairM::Frozen(snap) => {
                    if !["splitting", "split", "updating"].contains(&word(&st)) {
                        self.fail(format!(
                            "DATA: {name}: after the power loss the pair is {st:?}; its frozen copy is gone"
                        ));
                        self.adopt(i, &st);
                        continue;
                    }
                    self.check_frozen(i, &snap, &format!("right after the mount ({})", word(&st)));
                    match self.wait_state(i, &["split"], Duration::from_secs(120)) {
                        Ok(_) => self.check_frozen(i, &snap, "split"),
                        Err(e) => {
                            self.fail(format!("{name}: {e}"));
                            let st = self.state(i);
                            self.adopt(i, &st);
                        }
                    }
                }
                PairM::Paired => {
                    if !["forming", "formed", "resyncing"].contains(&word(&st)) {
                        self.fail(format!(
                            "{name}: after the power loss the pair is {st:?}, expected forming/formed/resyncing"
                        ));
                        self.adopt(i, &st);
                        continue;
                    }
                    if self.copy_path(i).exists() {
                        self.fail(format!("{name}: an unsplit pair offers a frozen copy"));
                    }
                    if let Err(e) = self.wait_state(i, &["formed"], Duration::from_secs(120)) {
                        self.fail(format!("{name}: {e}"));
                        let st = self.state(i);
                        self.adopt(i, &st);
                    }
                }
                PairM::None => {
                    if word(&st) != "none" {
                        self.fail(format!(
                            "{name}: after the power loss the released pair is back: {st:?}"
                        ));
                        self.adopt(i, &st);
                        continue;
                    }
                    if self.copy_path(i).exists() {
                        self.fail(format!(
                            "{name}: a released pair still offers a frozen copy"
                        ));
                    }
                }
            }
        }
    }

    /// After a failed state check, carries on from the state pairfs reports.
    fn adopt(&mut self, i: usize, st: &str) {
        self.files[i].pair = match word(st) {
            "none" => PairM::None,
            "forming" | "formed" | "resyncing" => PairM::Paired,
            _ => {
                if let Err(e) = set_control(&self.path(i), "release") {
                    panic!("release of the unexpected pair ({st}) failed: {e}");
                }
                PairM::None
            }
        };
    }

    /// One control operation on file `i`, following its pair's state machine.
    fn pair_op(&mut self, i: usize) {
        match self.files[i].pair.clone() {
            PairM::None => {
                if self.rng.chance(70) {
                    self.files[i].pair = PairM::Frozen(self.control(i, "split"));
                } else {
                    self.control(i, "pair");
                    self.files[i].pair = PairM::Paired;
                }
            }
            PairM::Paired => {
                if let Err(e) = self.wait_state(i, &["forming", "formed"], Duration::from_secs(120))
                {
                    panic!("{e}\n{}", self.env.log_tail());
                }
                self.files[i].pair = PairM::Frozen(self.control(i, "split"));
            }
            PairM::Frozen(_) => {
                if let Err(e) = self.wait_state(i, &["split"], Duration::from_secs(120)) {
                    panic!("{e}\n{}", self.env.log_tail());
                }
                let r = self.rng.below(100);
                if r < 60 {
                    self.files[i].pair = PairM::Frozen(self.control(i, "update"));
                } else if r < 85 {
                    self.control(i, "resync");
                    self.files[i].pair = PairM::Paired;
                } else {
                    self.control(i, "release");
                    self.files[i].pair = PairM::None;
                }
            }
        }
    }

    fn round(&mut self, seed: u64, crash: bool) {
        let commit_ms = [5, 100, 1000][self.rng.below(3) as usize];
        self.env.note(&format!(
            "round {} mount (commit_ms {commit_ms})",
            self.round
        ));
        if let Err(e) = self.env.mount(commit_ms) {
            self.fail(format!("remount after the power loss refused: {e}"));
            panic!("seed {seed}: cannot go on:\n{}", self.losses.join("\n"));
        }
        if self.files.is_empty() {
            self.create_files();
        } else {
            self.verify();
        }
        if !crash {
            return;
        }
        // Workload: writes, fsyncs and control ops on random files while a killer thread
        // kill -9s the daemon at a random moment. Control ops hold `ctl`, which the killer
        // takes too, so a split or update has either returned or not started; a write or
        // fsync may be cut (its write is logged before it is issued: its data may or may not
        // be there; an fsync that did not return promises nothing).
        let ctl = std::sync::Arc::new(std::sync::Mutex::new(false));
        let killer = {
            let ctl = ctl.clone();
            let vol = self.env.vol.clone();
            let paths: Vec<PathBuf> = (0..self.files.len()).map(|i| self.path(i)).collect();
            let delay = match self.rng.below(10) {
                0..=3 => self.rng.ms(0, 100),
                4..=7 => self.rng.ms(100, 600),
                _ => self.rng.ms(600, 1500),
            };
            thread::spawn(move || {
                thread::sleep(delay);
                let mut g = ctl.lock().unwrap();
                let states: Vec<String> = paths
                    .iter()
                    .map(|p| {
                        get_state(p)
                            .map(|s| word(&s).to_string())
                            .unwrap_or_else(|e| format!("?{e}"))
                    })
                    .collect();
                let pids = daemon_pids(&vol);
                for &p in &pids {
                    // SAFETY: kill on a pid of our own daemon.
                    unsafe { libc::kill(p, libc::SIGKILL) };
                }
                let dead = wait_dead(&pids, Duration::from_secs(20));
                *g = true;
                (delay, states, pids.len(), dead)
            })
        };
        let killed = |ctl: &std::sync::Mutex<bool>| *ctl.lock().unwrap();
        let steps = 50 + self.rng.below(1000);
        for _ in 0..steps {
            let i = self.rng.below(self.files.len() as u64) as usize;
            if self.rng.chance(5) {
                let g = ctl.lock().unwrap();
                if *g {
                    break;
                }
                self.pair_op(i);
                drop(g);
            } else if let Err(e) = self.write(i) {
                if killed(&ctl) {
                    break;
                }
                panic!(
                    "write to {}: {e}\n{}",
                    self.files[i].name,
                    self.env.log_tail()
                );
            }
            if killed(&ctl) {
                break;
            }
            if self.rng.chance(3) {
                thread::sleep(self.rng.ms(0, 20));
            }
        }
        let (delay, states, n, dead) = killer.join().expect("killer thread");
        assert!(
            n > 0,
            "no daemon process found for {}",
            self.env.vol.display()
        );
        assert!(dead, "the daemon survived SIGKILL");
        self.env.note(&format!(
            "round {}: kill -9 after {delay:?} (states {states:?}), power loss",
            self.round
        ));
        force_unmount(&self.env.mnt);
        force_unmount(&self.env.cmnt);
        self.env.power_loss();
        self.c.crashes += 1;
        for s in states {
            *self.c.crashed_in.entry(s).or_default() += 1;
        }
        self.env
            .start_lazyfs(splitmix(seed ^ (self.round + 1).wrapping_mul(0x9E37_79B9)));
        self.c.fscks += 1;
        if let Err(text) = self.env.fsck() {
            self.fail(format!("pairfs fsck after the power loss failed:\n{text}"));
        }
    }
}

#[test]
fn power_loss_under_lazyfs() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0
        || std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
            .is_err()
    {
        say("power-loss test: SKIPPED: needs root and /dev/fuse");
        return;
    }
    let rounds = env_u64("PAIRFS_POWERLOSS_ROUNDS", 40);
    let seed = env_seed("PAIRFS_POWERLOSS_SEED");
    say(&format!(
        "power-loss test: seed {seed} (rerun with PAIRFS_POWERLOSS_SEED={seed}), {rounds} rounds"
    ));
    let t0 = Instant::now();
    let mut env = Env::new();
    env.start_lazyfs(splitmix(seed));
    env.mkfs();
    let mut t = Test {
        env,
        rng: Rng::new(seed),
        files: Vec::new(),
        c: Counts::default(),
        losses: Vec::new(),
        round: 0,
    };
    for r in 0..rounds {
        t.round = r;
        t.round(seed, true);
    }
    t.round = rounds;
    t.round(seed, false);
    t.env.umount_clean();
    t.c.fscks += 1;
    if let Err(text) = t.env.fsck() {
        t.fail(format!(
            "pairfs fsck after the clean unmount failed:\n{text}"
        ));
    }
    let c = &t.c;
    let secs = t0.elapsed().as_secs_f64();
    say(&format!(
        "power-loss test: seed {seed}: {} writes, {} fsyncs, control ops {:?}, {} copy checks, \
         {} file checks, {} fscks; crashes by pair state {:?}; {:.1} s ({:.2} s per round)",
        c.writes,
        c.fsyncs,
        c.ops,
        c.copy_checks,
        c.main_checks,
        c.fscks,
        c.crashed_in,
        secs,
        secs / (rounds.max(1) as f64)
    ));
    say(&format!(
        "power-loss (lazyfs): {rounds} rounds, {} crashes, {} losses",
        c.crashes,
        t.losses.len()
    ));
    assert!(
        t.losses.is_empty(),
        "seed {seed}: {} losses:\n{}",
        t.losses.len(),
        t.losses.join("\n")
    );
}
