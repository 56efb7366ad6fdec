//! Online migration (`pairfs migrate`, issue 12 part 2) through real mounts: a busy volume
//! (a writer doing random 4 KiB writes, each fsync'd, plus a split directory pair whose
//! frozen copy is read through the copy mount the whole time) moved to a file and to an
//! NBD export (nbdkit, file plugin, Unix socket); the copy image moved; an abort; failing
//! targets (nbdkit killed mid-copy, a target on a small tmpfs that fills up); kill -9 of
//! the daemon early, midway and around the switch. After each: every page of the written
//! file holds its last write (or, after a kill, its fsync'd write or a later one), the
//! frozen copy and the other files are unchanged, `pairfs fsck` is clean, and the volume
//! mounts again with the same command line.
//!
//! `PAIRFS_MIGRATE_BPS` (the daemon's copy-rate cap) slows the copy so that the test can
//! act while it runs.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

mod crashmodel;
use crashmodel::{
    Model, PAGE, Rng, build, check_main, create_file, daemon_pids, force_unmount, fsck, mounted,
    reap_daemons, run_pairfs, wait_dead, wait_unmounted,
};

const MAGIC: &[u8; 8] = b"PFSMIGR1";
const WPAGES: usize = 4096; // 16 MiB written at random
const SIZE: &str = "512M";

fn sh(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", cmd])
        .status()
        .is_ok_and(|s| s.success())
}

fn md5(p: &Path) -> String {
    let out = Command::new("md5sum").arg(p).output().expect("md5sum");
    assert!(out.status.success(), "md5sum {}", p.display());
    String::from_utf8_lossy(&out.stdout)
        .split(' ')
        .next()
        .unwrap()
        .to_string()
}

fn getx(p: &Path, name: &str) -> Option<String> {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid C strings, a buffer of the given length.
    let r = unsafe { libc::getxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (r >= 0).then(|| String::from_utf8_lossy(&buf[..r as usize]).into_owned())
}

/// A volume with its mounts, a daemon log, and the files it checks.
struct Env {
    _dir: tempfile::TempDir,
    vol: PathBuf,
    mnt: PathBuf,
    cmnt: PathBuf,
    log: PathBuf,
    bps: Option<u64>,
    extra_env: Vec<(String, String)>,
    /// md5 of the static files (`s/NAME`) and of the frozen copies (`d/NAME`).
    sums: Vec<(String, String)>,
}

impl Env {
    fn new(bps: Option<u64>) -> Env {
        let base = std::env::var("PAIRFS_TEST_DIR").unwrap_or_else(|_| "/var/tmp".into());
        let dir = tempfile::Builder::new()
            .prefix("pairfs-migrate")
            .tempdir_in(base)
            .unwrap();
        let root = dir.path().canonicalize().unwrap();
        let e = Env {
            vol: root.join("vol.img"),
            mnt: root.join("mnt"),
            cmnt: root.join("copies"),
            log: root.join("daemon.log"),
            _dir: dir,
            bps,
            extra_env: Vec::new(),
            sums: Vec::new(),
        };
        std::fs::create_dir(&e.mnt).unwrap();
        std::fs::create_dir(&e.cmnt).unwrap();
        let (ok, t) = run_pairfs(&[
            "mkfs".as_ref(),
            e.vol.as_os_str(),
            "--size".as_ref(),
            SIZE.as_ref(),
        ]);
        assert!(ok, "mkfs: {t}");
        e
    }

    fn root(&self) -> PathBuf {
        self.vol.parent().unwrap().to_path_buf()
    }

    fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let l: Vec<&str> = s.lines().collect();
        l[l.len().saturating_sub(30)..].join("\n")
    }

    /// `pairfs mount VOL MNT --copy-mount COPIES --daemon`: the same command line every time.
    fn mount(&self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut c = Command::new(crashmodel::bin());
        c.arg("mount")
            .arg(&self.vol)
            .arg(&self.mnt)
            .arg("--copy-mount")
            .arg(&self.cmnt)
            .args(["--commit-ms", "200", "--daemon"])
            .env("RUST_LOG", "info")
            .env("PAIRFS_NBD_RECONNECT", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if let Some(b) = self.bps {
            c.env("PAIRFS_MIGRATE_BPS", b.to_string());
        }
        for (k, v) in &self.extra_env {
            c.env(k, v);
        }
        let st = c.status().unwrap();
        assert!(st.success(), "mount failed; log:\n{}", self.log_tail());
        assert!(mounted(&self.mnt) && mounted(&self.cmnt));
    }

    fn umount(&self) {
        let (ok, t) = run_pairfs(&["umount".as_ref(), self.mnt.as_os_str()]);
        assert!(ok, "umount: {t}\n{}", self.log_tail());
        wait_unmounted(&self.vol, &self.mnt, &self.cmnt);
        assert!(daemon_pids(&self.vol).is_empty(), "daemon still running");
    }

    fn kill9(&self) {
        let pids = daemon_pids(&self.vol);
        assert!(!pids.is_empty(), "no daemon to kill");
        for &p in &pids {
            // SAFETY: kill on a pid of our own daemon.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
        assert!(wait_dead(&pids, Duration::from_secs(20)));
        force_unmount(&self.mnt);
        force_unmount(&self.cmnt);
    }

    fn migrate(&self, args: &[&str]) -> (bool, String) {
        let mut a: Vec<&std::ffi::OsStr> = vec!["migrate".as_ref(), self.mnt.as_os_str()];
        a.extend(args.iter().map(|s| std::ffi::OsStr::new(*s)));
        run_pairfs(&a)
    }

    fn migration(&self) -> String {
        getx(&self.mnt, "user.pairfs.migration").unwrap_or_default()
    }

    fn wait_migration(&self, limit: Duration) -> String {
        let t = Instant::now();
        loop {
            let s = self.migration();
            if !s.starts_with("migrating") {
                return s;
            }
            assert!(
                t.elapsed() < limit,
                "migration did not end: {s}\n{}",
                self.log_tail()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn progress(&self) -> f64 {
        let s = self.migration();
        s.split(' ')
            .find_map(|kv| kv.strip_prefix("progress="))
            .and_then(|v| v.trim_end_matches('%').parse().ok())
            .unwrap_or(if s.starts_with("migrated") {
                100.0
            } else {
                0.0
            })
    }

    fn fsck(&self) {
        let r = fsck(&self.vol);
        assert!(r.is_ok(), "fsck: {r:?}\n{}", self.log_tail());
    }

    fn super_row(&self, key: &str) -> Option<String> {
        let c = rusqlite::Connection::open_with_flags(
            self.root().join("vol.img.meta"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        c.query_row("SELECT value FROM super WHERE key = ?1", [key], |r| {
            r.get(0)
        })
        .ok()
    }

    /// Static files, a split directory pair, and the file the writer rewrites.
    fn populate(&mut self) -> Model {
        std::fs::create_dir(self.mnt.join("s")).unwrap();
        std::fs::create_dir(self.mnt.join("d")).unwrap();
        let mut rng = Rng::new(7);
        for i in 0..6u64 {
            let n = (1 + rng.below(8)) as usize * (1 << 20) + rng.below(5000) as usize;
            let data: Vec<u8> = (0..n)
                .map(|k| (splitmix(i * 1_000_003 + k as u64) >> 7) as u8)
                .collect();
            std::fs::write(self.mnt.join(format!("s/f{i}")), &data).unwrap();
            std::fs::write(self.mnt.join(format!("d/g{i}")), &data[..n / 2]).unwrap();
        }
        let m = create_file(&self.mnt.join("w.bin"), 1, WPAGES, 64);
        let (ok, t) = run_pairfs(&[
            "split".as_ref(),
            self.mnt.join("d").as_os_str(),
            "--wait".as_ref(),
        ]);
        assert!(ok, "split: {t}");
        // The directory changes after the split: the frozen copy must not.
        for i in 0..6u64 {
            std::fs::write(self.mnt.join(format!("d/g{i}")), b"changed after the split").unwrap();
        }
        for i in 0..6u64 {
            let s = format!("s/f{i}");
            let sum = md5(&self.mnt.join(&s));
            self.sums.push((s, sum));
            let d = format!("d/g{i}");
            let sum = md5(&self.cmnt.join(&d));
            self.sums.push((d, sum));
        }
        m
    }

    /// Every static file and frozen copy as recorded.
    fn check_sums(&self) {
        for (rel, sum) in &self.sums {
            let p = if rel.starts_with("s/") {
                self.mnt.join(rel)
            } else {
                self.cmnt.join(rel)
            };
            assert_eq!(&md5(&p), sum, "{} changed", p.display());
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = crashmodel::detach(&self.mnt);
        let _ = crashmodel::detach(&self.cmnt);
        reap_daemons(&self.vol);
    }
}

fn splitmix(z: u64) -> u64 {
    crashmodel::splitmix(z)
}

/// Random 4 KiB page writes, each fsync'd, into `w.bin`, until `stop` (or an error: the
/// daemon was killed). The model's `synced` is what each acknowledged fsync covered.
fn writer(path: PathBuf, m: Arc<Mutex<Model>>, stop: Arc<AtomicBool>, lat: Arc<Mutex<Vec<f64>>>) {
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let mut rng = Rng::new(99);
    while !stop.load(Ordering::Relaxed) {
        let p = rng.below(WPAGES as u64);
        let id = {
            let mut g = m.lock().unwrap();
            let id = g.new_write(p, 1);
            g.cur[p as usize] = id;
            id
        };
        let t = Instant::now();
        if f.write_all_at(&build(p, 1, id), p * PAGE as u64).is_err() || f.sync_data().is_err() {
            return;
        }
        lat.lock().unwrap().push(t.elapsed().as_secs_f64() * 1000.0);
        m.lock().unwrap().synced[p as usize] = id;
    }
}

/// Reads the frozen copy through the copy mount until `stop`; any difference is recorded.
fn copy_reader(
    e_cmnt: PathBuf,
    sums: Vec<(String, String)>,
    stop: Arc<AtomicBool>,
    bad: Arc<Mutex<Vec<String>>>,
) {
    while !stop.load(Ordering::Relaxed) {
        for (rel, sum) in sums.iter().filter(|(r, _)| r.starts_with("d/")) {
            let p = e_cmnt.join(rel);
            match Command::new("md5sum").arg(&p).output() {
                Ok(o) if o.status.success() => {
                    let got = String::from_utf8_lossy(&o.stdout)
                        .split(' ')
                        .next()
                        .unwrap_or("")
                        .to_string();
                    if &got != sum {
                        bad.lock().unwrap().push(format!("{rel}: {got} != {sum}"));
                    }
                }
                _ => return, // the mount went away (a kill)
            }
        }
    }
}

struct Load {
    stop: Arc<AtomicBool>,
    model: Arc<Mutex<Model>>,
    bad: Arc<Mutex<Vec<String>>>,
    lat: Arc<Mutex<Vec<f64>>>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Load {
    fn start(e: &Env, m: Model) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let model = Arc::new(Mutex::new(m));
        let bad = Arc::new(Mutex::new(Vec::new()));
        let lat = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        {
            let (p, m, s, l) = (
                e.mnt.join("w.bin"),
                model.clone(),
                stop.clone(),
                lat.clone(),
            );
            threads.push(thread::spawn(move || writer(p, m, s, l)));
        }
        {
            let (c, sums, s, b) = (e.cmnt.clone(), e.sums.clone(), stop.clone(), bad.clone());
            threads.push(thread::spawn(move || copy_reader(c, sums, s, b)));
        }
        Load {
            stop,
            model,
            bad,
            lat,
            threads,
        }
    }

    /// Stops the threads; returns the model.
    fn stop(self) -> Model {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        let bad = self.bad.lock().unwrap();
        assert!(
            bad.is_empty(),
            "the frozen copy changed during the migration: {bad:?}"
        );
        let n = self.lat.lock().unwrap().len();
        assert!(n > 0, "the writer made no progress");
        Arc::try_unwrap(self.model)
            .ok()
            .unwrap()
            .into_inner()
            .unwrap()
    }
}

/// After a clean run: every page holds exactly its last write.
fn check_exact(e: &Env, m: &Model) {
    let data = std::fs::read(e.mnt.join("w.bin")).unwrap();
    let mut exact = Model::new(m.tag, 0);
    exact.synced.clone_from(&m.cur);
    exact.log.clone_from(&m.log);
    let (_, probs) = check_main(&data, &exact);
    assert!(
        probs.is_empty(),
        "written file: {:?}",
        &probs[..probs.len().min(5)]
    );
}

/// After a kill: fsync'd writes (or later ones) are there.
fn check_synced(e: &Env, m: &Model) {
    let data = std::fs::read(e.mnt.join("w.bin")).unwrap();
    let (_, probs) = check_main(&data, m);
    assert!(
        probs.is_empty(),
        "written file after kill: {:?}",
        &probs[..probs.len().min(5)]
    );
}

/// Migrates a busy volume to `target`, checks everything, remounts with the same
/// command line and checks again. Returns the env for further checks.
fn busy_migration(e: &mut Env, args: &[&str]) {
    e.mount();
    let m = e.populate();
    let load = Load::start(e, m);
    thread::sleep(Duration::from_millis(300));
    let (ok, t) = e.migrate(args);
    assert!(ok, "migrate: {t}\n{}", e.log_tail());
    assert!(t.contains("migrated"), "{t}");
    thread::sleep(Duration::from_millis(300));
    let m = load.stop();
    check_exact(e, &m);
    e.check_sums();
    e.umount();
    e.fsck();
    e.mount();
    check_exact(e, &m);
    e.check_sums();
    e.umount();
}

#[test]
fn busy_volume_migrates_to_a_file_and_mounts_again_with_the_same_command_line() {
    let mut e = Env::new(Some(64 << 20));
    let target = e.root().join("elsewhere").join("moved.img");
    std::fs::create_dir(target.parent().unwrap()).unwrap();
    busy_migration(&mut e, &["--to", target.to_str().unwrap(), "--wait"]);
    assert_eq!(e.super_row("volume_image").as_deref(), target.to_str());
    assert!(e.super_row("migrate_target").is_none());
    // The source is no longer used: the volume works without it.
    std::fs::rename(&e.vol, e.root().join("old.img")).unwrap();
    e.mount();
    assert!(
        std::fs::read_to_string(&e.log)
            .unwrap()
            .contains("since a migration")
    );
    e.check_sums();
    e.umount();
    std::fs::rename(e.root().join("old.img"), &e.vol).unwrap();
}

/// An nbdkit file-plugin export over a Unix socket; killed on drop.
struct Nbdkit {
    child: Child,
    uri: String,
}

impl Nbdkit {
    fn start(dir: &Path, name: &str, size: u64) -> Nbdkit {
        assert!(
            sh("command -v nbdkit >/dev/null"),
            "nbdkit is not installed"
        );
        let file = dir.join(format!("{name}.img"));
        std::fs::File::create(&file).unwrap().set_len(size).unwrap();
        let sock = dir.join(format!("{name}.sock"));
        let child = Command::new("nbdkit")
            .arg("-f")
            .arg("-U")
            .arg(&sock)
            .arg("file")
            .arg(&file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let t = Instant::now();
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "nbdkit did not start"
            );
            thread::sleep(Duration::from_millis(20));
        }
        Nbdkit {
            child,
            uri: format!("nbd+unix:///?socket={}", sock.display()),
        }
    }
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        self.kill();
    }
}

#[test]
fn busy_volume_migrates_to_an_nbd_export() {
    let mut e = Env::new(Some(64 << 20));
    let srv = Nbdkit::start(&e.root(), "target", 512 << 20);
    busy_migration(&mut e, &["--to", &srv.uri, "--wait"]);
    assert_eq!(
        e.super_row("volume_image").as_deref(),
        Some(srv.uri.as_str())
    );
    drop(srv);
}

#[test]
fn the_copy_image_migrates_and_frozen_copies_follow() {
    let mut e = Env::new(Some(64 << 20));
    let target = e.root().join("copy2.img");
    busy_migration(
        &mut e,
        &["--to", target.to_str().unwrap(), "--copy-image", "--wait"],
    );
    assert_eq!(e.super_row("copy_image").as_deref(), target.to_str());
    // The new copy image takes the next update.
    e.mount();
    let d = e.mnt.join("d");
    let (ok, t) = run_pairfs(&["update".as_ref(), d.as_os_str(), "--wait".as_ref()]);
    assert!(ok, "update: {t}");
    for i in 0..6 {
        let got = std::fs::read(e.cmnt.join(format!("d/g{i}"))).unwrap();
        assert_eq!(got, b"changed after the split");
    }
    e.umount();
    e.fsck();
}

#[test]
fn abort_returns_to_the_source() {
    let mut e = Env::new(Some(32 << 20));
    e.mount();
    let m = e.populate();
    let load = Load::start(&e, m);
    let inside = e.mnt.join("inside.img");
    let (ok, t) = e.migrate(&["--to", inside.to_str().unwrap()]);
    assert!(!ok, "a target inside the mount itself is refused: {t}");
    let target = e.root().join("t.img");
    let (ok, t) = e.migrate(&["--to", target.to_str().unwrap()]);
    assert!(ok, "{t}");
    let (ok, t) = e.migrate(&["--to", e.root().join("t2.img").to_str().unwrap()]);
    assert!(!ok, "one migration at a time: {t}");
    thread::sleep(Duration::from_millis(1500));
    assert!(e.migration().starts_with("migrating"), "{}", e.migration());
    let (ok, t) = e.migrate(&["--abort"]);
    assert!(ok, "{t}");
    assert!(t.contains("aborted"), "{t}");
    assert!(!target.exists(), "the partial target file is removed");
    let m = load.stop();
    check_exact(&e, &m);
    e.check_sums();
    e.umount();
    assert!(e.super_row("volume_image").is_none());
    assert!(e.super_row("migrate_target").is_none());
    e.fsck();
    e.mount();
    check_exact(&e, &m);
    e.umount();
}

#[test]
fn a_target_that_dies_aborts_with_the_source_intact() {
    let mut e = Env::new(Some(32 << 20));
    let mut srv = Nbdkit::start(&e.root(), "dying", 512 << 20);
    e.mount();
    let m = e.populate();
    let load = Load::start(&e, m);
    let (ok, t) = e.migrate(&["--to", &srv.uri]);
    assert!(ok, "{t}");
    thread::sleep(Duration::from_millis(1500));
    srv.kill();
    let s = e.wait_migration(Duration::from_secs(60));
    assert!(s.starts_with("aborted") && s.contains("error="), "{s}");
    // The host writes went on.
    thread::sleep(Duration::from_millis(500));
    let m = load.stop();
    check_exact(&e, &m);
    e.check_sums();
    e.umount();
    assert!(e.super_row("volume_image").is_none());
    e.fsck();
    e.mount();
    check_exact(&e, &m);
    e.umount();
}

#[test]
fn a_target_that_fills_up_aborts_with_the_source_intact() {
    let mut e = Env::new(None);
    let small = e.root().join("small");
    std::fs::create_dir(&small).unwrap();
    if !sh(&format!(
        "mount -t tmpfs -o size=24m tmpfs {}",
        small.display()
    )) {
        eprintln!("cannot mount a tmpfs (not root?): skipped");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _u = Unmount(small.clone());
    e.mount();
    let m = e.populate();
    let load = Load::start(&e, m);
    let (ok, t) = e.migrate(&["--to", small.join("t.img").to_str().unwrap(), "--wait"]);
    assert!(!ok, "a full target must abort: {t}");
    assert!(t.contains("aborted"), "{t}");
    let m = load.stop();
    check_exact(&e, &m);
    e.check_sums();
    e.umount();
    assert!(e.super_row("volume_image").is_none());
    e.fsck();
}

/// kill -9 of the daemon during a migration at `when`; the next mount resumes it (or has
/// completed it) and nothing fsync'd is lost.
fn kill_during(when: &str) {
    kill_and_resume(when, false);
}

/// [`kill_during`]; with `scribble`, garbage is then written over the target's first
/// 64 MiB (below the durable mark): what a power cut could leave of copied tracks and of
/// mirrored writes never synced on the target. The resume must verify and repair them.
fn kill_and_resume(when: &str, scribble: bool) {
    let mut e = Env::new(Some(48 << 20));
    if when == "recorded" {
        e.extra_env
            .push(("PAIRFS_MIGRATE_SWITCH_PAUSE_MS".into(), "3000".into()));
    }
    let target = e.root().join("t.img");
    e.mount();
    let m = e.populate();
    let load = Load::start(&e, m);
    let (ok, t) = e.migrate(&["--to", target.to_str().unwrap()]);
    assert!(ok, "{t}");
    let t0 = Instant::now();
    let limit = Duration::from_secs(120);
    match when {
        "early" => thread::sleep(Duration::from_millis(700)),
        "mid" => {
            while e.progress() < 50.0 && t0.elapsed() < limit {
                thread::sleep(Duration::from_millis(20));
            }
        }
        "switch" => {
            while e.progress() < 99.0 && t0.elapsed() < limit {
                thread::sleep(Duration::from_millis(2));
            }
        }
        "recorded" => {
            while !e.migration().contains("phase=switching") && t0.elapsed() < limit {
                thread::sleep(Duration::from_millis(5));
            }
        }
        "after" => {
            while !e.migration().starts_with("migrated") && t0.elapsed() < limit {
                thread::sleep(Duration::from_millis(2));
            }
        }
        _ => unreachable!(),
    }
    let at = e.migration();
    if when == "recorded" {
        assert!(at.contains("phase=switching"), "{at}");
        assert_eq!(e.super_row("volume_image").as_deref(), target.to_str());
    }
    e.kill9();
    let m = load.stop_after_kill();
    if scribble {
        let t = std::fs::OpenOptions::new()
            .write(true)
            .open(&target)
            .unwrap();
        let junk = vec![0xA5u8; 1 << 20];
        for mib in 1..65u64 {
            t.write_all_at(&junk, mib << 20).unwrap();
        }
        t.sync_all().unwrap();
    }
    e.fsck();
    e.mount();
    check_synced(&e, &m);
    e.check_sums();
    let s = e.migration();
    crashmodel::say(&format!(
        "kill {when}: killed at `{at}`; after remount: `{s}`"
    ));
    if s.starts_with("migrating") {
        assert!(s.contains("phase=verify") || when == "early", "{s}");
        let end = e.wait_migration(Duration::from_secs(120));
        assert!(
            end.starts_with("migrated"),
            "resumed migration ended: {end}\n{}",
            e.log_tail()
        );
    }
    // Either resumed to the end or switched before the kill.
    assert_eq!(
        e.super_row("volume_image").as_deref(),
        target.to_str(),
        "killed at {at}: after remount the volume must end on the target"
    );
    check_synced(&e, &m);
    e.check_sums();
    e.umount();
    e.fsck();
    e.mount();
    check_synced(&e, &m);
    e.check_sums();
    e.umount();
}

impl Load {
    /// Stops the threads after a kill (the writer stopped at its first error).
    fn stop_after_kill(self) -> Model {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        let bad = self.bad.lock().unwrap();
        assert!(bad.is_empty(), "the frozen copy changed: {bad:?}");
        Arc::try_unwrap(self.model)
            .ok()
            .unwrap()
            .into_inner()
            .unwrap()
    }
}

#[test]
fn kill_9_early_in_a_migration_resumes_it() {
    kill_during("early");
}

#[test]
fn kill_9_midway_resumes_with_verification() {
    kill_during("mid");
}

#[test]
fn a_resume_repairs_what_the_target_lost_below_the_mark() {
    kill_and_resume("mid", true);
}

#[test]
fn kill_9_around_the_switch_loses_nothing() {
    kill_during("switch");
}

#[test]
fn kill_9_between_the_durable_switch_and_the_swap_mounts_the_target() {
    kill_during("recorded");
}

#[test]
fn kill_9_right_after_the_switch_mounts_the_target() {
    kill_during("after");
}
