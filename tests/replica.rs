//! Replication to a second node over loopback (`pairfs replica serve` + `pairfs mount
//! --replica`): byte-identical files and frozen copies on both sides after a clean
//! stop (fsck on both), refusals (wrong key, other volume, other protocol version, a
//! replica mounted read-write), garbage on the listener, and kill -9 of the secondary
//! with `--on-disconnect continue` (the primary keeps serving; the restarted secondary
//! is brought back by replay); the primary's persistent out-of-sync bitmap (stopped or
//! killed out of sync, killed while connected: a resync by bitmap, not a full sync); a
//! full secondary disk (tmpfs) and a failing one (EIO: ext4 on a loop device over a FUSE
//! file served here that fails on demand); a link cut, refused and corrupted at random
//! moments; failover and the old primary rejoining as the secondary by bitmap (the new
//! primary killed -9 during the rejoin included).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{BIN, Vol, block, kill9_mount, pairfs};
use pairfs::repl::proto::{self, Msg};

/// Held by the activity-log test and the rejoin tests: the activity log's size depends
/// on how often its checkpoints run, so the rejoin tests' 64 MiB writes and full syncs
/// must not load the machine while that test measures it (they did: 83 and 222 MB
/// resent instead of 7 to 44).
static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn heavy() -> std::sync::MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(|p| p.into_inner())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn key_file(dir: &Path, name: &str, content: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// A secondary: `pairfs replica serve` in the background.
struct Secondary {
    img: PathBuf,
    addr: String,
    key: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// More arguments of `replica serve` (`--rejoin`).
    extra: Vec<&'static str>,
}

impl Secondary {
    fn start(dir: &Path, key: &Path) -> Secondary {
        Secondary::start_in(dir, dir, key)
    }

    /// A secondary whose images live in `img_dir` and whose log in `log_dir`.
    fn start_in(img_dir: &Path, log_dir: &Path, key: &Path) -> Secondary {
        let mut s = Secondary {
            img: img_dir.join("secondary.img"),
            addr: format!("127.0.0.1:{}", free_port()),
            key: key.to_path_buf(),
            log: log_dir.join("secondary.log"),
            child: None,
            extra: Vec::new(),
        };
        s.restart();
        s
    }

    fn restart(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(BIN)
            .args(["replica", "serve", self.img.to_str().unwrap()])
            .args([
                "--listen",
                &self.addr,
                "--key-file",
                self.key.to_str().unwrap(),
            ])
            .args(&self.extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let t = Instant::now();
        while TcpStream::connect(&self.addr).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "secondary did not listen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// SIGTERM (clean) or SIGKILL.
    fn stop(&mut self, sig: &str) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args([sig, &c.id().to_string()])
                .output();
            let _ = c.wait();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Secondary {
    fn drop(&mut self) {
        self.stop("-9");
    }
}

/// A TCP proxy between the nodes that delays every chunk by `delay` one way and can cut
/// the link at once (queued bytes are dropped: a partition with data in flight).
struct Proxy {
    addr: String,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Proxy {
    fn start(target: &str, delay: Duration) -> Proxy {
        use std::sync::atomic::{AtomicBool, Ordering};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let cut = std::sync::Arc::new(AtomicBool::new(false));
        let (c2, target) = (cut.clone(), target.to_string());
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(c) = c else { return };
                let Ok(u) = TcpStream::connect(&target) else {
                    continue;
                };
                for (mut from, mut to) in [(c.try_clone().unwrap(), u.try_clone().unwrap()), (u, c)]
                {
                    let cut = c2.clone();
                    let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
                    std::thread::spawn(move || {
                        let mut b = vec![0u8; 1 << 16];
                        while let Ok(n) = from.read(&mut b) {
                            if n == 0 || tx.send((Instant::now() + delay, b[..n].to_vec())).is_err()
                            {
                                break;
                            }
                        }
                    });
                    std::thread::spawn(move || {
                        while let Ok((due, b)) = rx.recv() {
                            std::thread::sleep(due.saturating_duration_since(Instant::now()));
                            if cut.load(Ordering::SeqCst) || to.write_all(&b).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Proxy { addr, cut }
    }

    fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

fn mount_replica(v: &mut Vol, s: &Secondary, extra: &[&str]) -> std::process::Output {
    mount_replica_env(v, s, extra, &[])
}

/// [`mount_replica`] with more environment variables for the daemon.
fn mount_replica_env(
    v: &mut Vol,
    s: &Secondary,
    extra: &[&str],
    env: &[(&str, &str)],
) -> std::process::Output {
    let mut args = vec![
        "mount",
        v.img.to_str().unwrap(),
        v.mnt.to_str().unwrap(),
        "--copy-mount",
        v.copy.to_str().unwrap(),
        "--replica",
        &s.addr,
        "--key-file",
        s.key.to_str().unwrap(),
        "--daemon",
    ];
    args.extend_from_slice(extra);
    let out = Command::new(BIN)
        .args(&args)
        .env("PAIRFS_LOG_FILE", v.dir.path().join("primary.log"))
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    if out.status.success() {
        v.adopt_mount();
    }
    out
}

fn replica_line(mnt: &Path) -> String {
    // One getxattr with a large buffer: the line changes size from call to call, so a
    // size probe first (as getfattr does) can fail with ERANGE.
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(mnt.as_os_str().as_bytes()).unwrap();
    let n = std::ffi::CString::new("user.pairfs.replica").unwrap();
    let mut buf = vec![0u8; 65536];
    // SAFETY: valid C strings, buffer of the given length.
    let r = unsafe { libc::getxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(
        r >= 0,
        "getxattr replica: {}",
        std::io::Error::last_os_error()
    );
    buf.truncate(r as usize);
    String::from_utf8(buf).unwrap()
}

fn write_fsync(p: &Path, data: &[u8]) {
    let mut f = std::fs::File::create(p).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

/// Every path under `root` with its kind, mode, size and (files) content hash.
fn tree(root: &Path) -> Vec<String> {
    fn walk(root: &Path, d: &Path, out: &mut Vec<String>) {
        let mut names: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        for p in names {
            let m = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            if m.is_dir() {
                out.push(format!("{rel}/ mode={:o}", m.mode()));
                walk(root, &p, out);
            } else if m.file_type().is_symlink() {
                out.push(format!("{rel} -> {:?}", std::fs::read_link(&p).unwrap()));
            } else {
                let data = std::fs::read(&p).unwrap();
                out.push(format!(
                    "{rel} mode={:o} size={} crc={:08x} mtime={}",
                    m.mode(),
                    m.len(),
                    crc32c::crc32c(&data),
                    m.mtime_nsec() + m.mtime() * 1_000_000_000
                ));
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out
}

fn ok(out: &std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Mounts the (promoted) secondary with its copy mount and compares both trees with
/// the primary's, then unmounts both. Returns the copy mount's tree.
fn compare_sides(v: &mut Vol, s: &Secondary) -> Vec<String> {
    let smnt = v.dir.path().join("smnt");
    let scopy = v.dir.path().join("scopy");
    std::fs::create_dir_all(&smnt).unwrap();
    std::fs::create_dir_all(&scopy).unwrap();
    v.mount();
    ok(
        &pairfs(&[
            "mount",
            s.img.to_str().unwrap(),
            smnt.to_str().unwrap(),
            "--copy-mount",
            scopy.to_str().unwrap(),
            "--daemon",
        ]),
        "mount the promoted secondary",
    );
    let (a, b) = (tree(&v.mnt), tree(&smnt));
    let (ca, cb) = (tree(&v.copy), tree(&scopy));
    ok(
        &pairfs(&["umount", smnt.to_str().unwrap()]),
        "umount secondary",
    );
    v.umount();
    assert!(a.len() > 3, "{a:?}");
    assert_eq!(a, b, "live trees differ");
    assert!(!ca.is_empty(), "no frozen copies to compare");
    assert_eq!(ca, cb, "frozen copies (and named generations) differ");
    ca
}

#[test]
fn both_sides_hold_the_same_files_and_frozen_copies() {
    let mut v = Vol::new("1G");
    let key = key_file(v.dir.path(), "key", "0123456789abcdef0123456789abcdef\n");
    let mut s = Secondary::start(v.dir.path(), &key);
    // -o options, as in fstab.
    let out = Command::new(BIN)
        .args(["mount", v.img.to_str().unwrap(), v.mnt.to_str().unwrap()])
        .args(["--copy-mount", v.copy.to_str().unwrap(), "--daemon", "-o"])
        .arg(format!(
            "replica={},key_file={},replica_mode=sync,on_disconnect=block",
            s.addr,
            key.display()
        ))
        .output()
        .unwrap();
    ok(&out, "mount with -o replica");
    v.adopt_mount();
    let line = replica_line(&v.mnt);
    assert!(
        line.contains("mode=sync") && line.contains("on_disconnect=block"),
        "{line}"
    );
    // Files, a directory pair split with copy-on-write after it, a file pair.
    std::fs::create_dir_all(v.path("d/sub")).unwrap();
    for i in 0..20u64 {
        write_fsync(
            &v.path(&format!("d/f{i}")),
            &block(i, 1, 10_000 + i as usize * 7_000),
        );
    }
    write_fsync(&v.path("d/sub/big"), &block(99, 1, 3 << 20));
    write_fsync(&v.path("solo"), &block(7, 1, 1 << 20));
    std::os::unix::fs::symlink("f1", v.path("d/link")).unwrap();
    ok(
        &pairfs(&["split", v.path("d").to_str().unwrap(), "--wait"]),
        "split d",
    );
    ok(
        &pairfs(&["split", v.path("solo").to_str().unwrap(), "--wait"]),
        "split solo",
    );
    // A named generation of d: its saves (copy-image writes and rows) replicate too.
    ok(
        &pairfs(&["split", "--generation", "g1", v.path("d").to_str().unwrap()]),
        "split --generation g1 d",
    );
    let g1 = std::fs::read(v.path("d/f3")).unwrap();
    for i in 0..10u64 {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(v.path(&format!("d/f{i}")))
            .unwrap();
        f.write_all(&block(i, 2, 5000)).unwrap();
        f.sync_all().unwrap();
    }
    ok(
        &pairfs(&["split", "--generation", "g2", v.path("d").to_str().unwrap()]),
        "split --generation g2 d",
    );
    std::fs::remove_file(v.path("d/f15")).unwrap();
    write_fsync(&v.path("d/new"), &block(50, 1, 70_000));
    write_fsync(&v.path("d/f3"), &block(3, 3, 9000));
    assert_eq!(
        std::fs::read(v.copy.join("@g1/d/f3")).unwrap(),
        g1,
        "g1 on the primary"
    );
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(v.path("solo"))
            .unwrap();
        f.write_all(&block(7, 2, 100_000)).unwrap();
    }
    write_fsync(&v.path("unsynced-then-umount"), &block(8, 1, 200_000));
    let st = pairfs(&["status", v.mnt.to_str().unwrap()]);
    ok(&st, "status");
    let st = String::from_utf8_lossy(&st.stdout).into_owned();
    assert!(st.contains("replica 127.0.0.1"), "{st}");
    let line = replica_line(&v.mnt);
    assert!(
        !line.starts_with("disconnected") && !line.starts_with("out_of_sync"),
        "{line}"
    );
    v.umount();
    s.stop("-TERM");
    // A replica refuses a read-write mount until promoted.
    let smnt = v.dir.path().join("smnt");
    std::fs::create_dir_all(&smnt).unwrap();
    let out = pairfs(&[
        "mount",
        s.img.to_str().unwrap(),
        smnt.to_str().unwrap(),
        "--daemon",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("replica promote"), "{err}");
    ok(
        &pairfs(&["replica", "promote", s.img.to_str().unwrap()]),
        "promote",
    );
    v.fsck();
    ok(
        &pairfs(&["fsck", s.img.to_str().unwrap()]),
        "fsck secondary",
    );
    let copies = compare_sides(&mut v, &s);
    for g in ["@g1/d/f3 ", "@g2/d/f3 "] {
        assert!(
            copies.iter().any(|l| l.starts_with(g)),
            "{g} missing: {copies:?}"
        );
    }
    assert!(s.log().contains("full sync"), "{}", s.log());
}

/// Sends `bytes` to the listener and reads whatever comes back (until EOF or 3 s).
fn poke(addr: &str, bytes: &[u8]) -> Vec<u8> {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let _ = c.write_all(bytes);
    let _ = c.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    out
}

#[test]
fn refusals_are_clear_and_garbage_does_not_hurt_the_secondary() {
    let mut v = Vol::new("256M");
    let key = key_file(v.dir.path(), "key", "the-right-key-0123456789");
    let wrong = key_file(v.dir.path(), "wrong", "the-wrong-key-0123456789");
    let mut s = Secondary::start(v.dir.path(), &key);

    // Garbage: random bytes, a huge length, a truncated frame, a bad checksum.
    let mut x = 0x1234_5678_9abc_def0u64;
    let mut rnd = vec![0u8; 5000];
    for b in rnd.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let hello = proto::frame(&Msg::Hello {
        version: proto::VERSION,
        nonce: [1; 32],
        uuid: [2; 16],
        size: 1 << 28,
        track_size: 65536,
    });
    let mut badcrc = hello.clone();
    badcrc[5] ^= 1;
    for g in [
        &rnd[..],
        &[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0][..],
        &hello[..hello.len() - 3],
        &badcrc[..],
        b"GET / HTTP/1.0\r\n\r\n",
    ] {
        poke(&s.addr, g);
        assert!(s.alive(), "the secondary died on garbage");
    }
    // Another protocol version: refused with the reason.
    let v99 = proto::frame(&Msg::Hello {
        version: 99,
        nonce: [1; 32],
        uuid: [2; 16],
        size: 1 << 28,
        track_size: 65536,
    });
    let r = poke(&s.addr, &v99);
    let m = proto::recv(&mut &r[..]).unwrap();
    assert!(
        matches!(&m, Msg::Refuse { reason } if reason.contains("protocol version 99")),
        "{m:?}"
    );
    // Wrong key: the mount fails and says so; the key is in no message.
    let addr = s.addr.clone();
    let mut args = vec![
        "mount",
        v.img.to_str().unwrap(),
        v.mnt.to_str().unwrap(),
        "--replica",
        &addr,
        "--key-file",
        wrong.to_str().unwrap(),
        "--daemon",
    ];
    let out = pairfs(&args);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("authentication failed"), "{err}");
    assert!(
        !err.contains("wrong-key") && !s.log().contains("right-key"),
        "{err}"
    );
    assert!(s.alive());
    // A key file others can read is refused before connecting.
    std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = pairfs(&args);
    assert!(String::from_utf8_lossy(&out.stderr).contains("chmod 600"));
    // The right key works after all that, while a silent peer holds a connection open
    // (handshakes run concurrently: it does not hold up the primary for its 10 s timeout).
    let _silent = TcpStream::connect(&s.addr).unwrap();
    args[6] = key.to_str().unwrap();
    let t = Instant::now();
    ok(&pairfs(&args), "mount with the right key");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    v.adopt_mount();
    write_fsync(&v.path("f"), b"replicated");
    v.umount();
    // Another volume is refused by the secondary that now holds this one.
    let mut other = Vol::new("256M");
    let out = mount_replica(&mut other, &s, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("holds a replica of volume"), "{err}");
    assert!(s.alive());
}

#[test]
fn killing_the_secondary_with_continue_keeps_the_primary_serving() {
    let mut v = Vol::new("512M");
    let key = key_file(v.dir.path(), "key", "0123456789abcdef-continue");
    let mut s = Secondary::start(v.dir.path(), &key);
    ok(
        &mount_replica(&mut v, &s, &["--on-disconnect", "continue"]),
        "mount --on-disconnect continue",
    );
    std::fs::create_dir(v.path("d")).unwrap();
    write_fsync(&v.path("d/before"), &block(1, 1, 300_000));
    ok(
        &pairfs(&["split", v.path("d").to_str().unwrap(), "--wait"]),
        "split d",
    );
    s.stop("-9");
    // The primary goes on: writes and fsyncs return while the secondary is dead.
    let t = Instant::now();
    for i in 0..20u64 {
        write_fsync(&v.path(&format!("d/during{i}")), &block(i, 3, 50_000));
    }
    write_fsync(&v.path("d/before"), &block(1, 2, 100_000));
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    let line = replica_line(&v.mnt);
    assert!(line.starts_with("disconnected"), "{line}");
    assert!(
        common::field(&line, "queued_bytes").is_some_and(|q| q > 500_000),
        "{line}"
    );
    // Restarted, the secondary is brought back by replaying what it missed.
    s.restart();
    let t = Instant::now();
    loop {
        let line = replica_line(&v.mnt);
        if line.starts_with("in_sync") {
            assert!(
                common::field(line.trim(), "reconnects").unwrap() >= 1,
                "{line}"
            );
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "not back in sync: {line}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    write_fsync(&v.path("d/after"), &block(2, 1, 20_000));
    stop_promote_and_compare(&mut v, &mut s);
}

#[test]
fn with_block_an_fsync_waits_for_the_secondary_to_come_back() {
    let mut v = Vol::new("256M");
    let key = key_file(v.dir.path(), "key", "0123456789abcdef-block");
    let mut s = Secondary::start(v.dir.path(), &key);
    ok(
        &mount_replica(&mut v, &s, &["--on-disconnect", "block"]),
        "mount --on-disconnect block",
    );
    write_fsync(&v.path("a"), &block(1, 1, 100_000));
    s.stop("-9");
    let p = v.path("b");
    let t = std::thread::spawn(move || {
        write_fsync(&p, &block(2, 1, 100_000));
        Instant::now()
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !t.is_finished(),
        "fsync returned while the secondary was down"
    );
    let restarted = Instant::now();
    s.restart();
    let done = t.join().unwrap();
    assert!(done > restarted);
    v.umount();
    s.stop("-TERM");
    ok(
        &pairfs(&["replica", "promote", s.img.to_str().unwrap()]),
        "promote",
    );
    ok(
        &pairfs(&["fsck", s.img.to_str().unwrap()]),
        "fsck secondary",
    );
    let smnt = v.dir.path().join("smnt");
    std::fs::create_dir_all(&smnt).unwrap();
    ok(
        &pairfs(&[
            "mount",
            s.img.to_str().unwrap(),
            smnt.to_str().unwrap(),
            "--daemon",
        ]),
        "mount secondary",
    );
    let b = std::fs::read(smnt.join("b"));
    ok(
        &pairfs(&["umount", smnt.to_str().unwrap()]),
        "umount secondary",
    );
    assert_eq!(b.unwrap(), block(2, 1, 100_000));
}

#[test]
fn after_kill_9_of_the_primary_the_secondary_holds_every_acknowledged_fsync() {
    let mut v = Vol::new("512M");
    let key = key_file(v.dir.path(), "key", "0123456789abcdef-primary-crash");
    let mut s = Secondary::start(v.dir.path(), &key);
    // Through a 3 ms proxy: records are in flight when the link is cut.
    let proxy = Proxy::start(&s.addr, Duration::from_millis(3));
    let out = Command::new(BIN)
        .args(["mount", v.img.to_str().unwrap(), v.mnt.to_str().unwrap()])
        .args(["--copy-mount", v.copy.to_str().unwrap(), "--daemon"])
        .args([
            "--replica",
            &proxy.addr,
            "--key-file",
            key.to_str().unwrap(),
        ])
        .args(
            // `async` here shows what the test catches: it fails (acknowledged fsyncs lost).
            std::env::var("PAIRFS_TEST_REPLICA_MODE")
                .ok()
                .filter(|m| !m.is_empty())
                .map_or(vec![], |m| vec!["--replica-mode".to_string(), m]),
        )
        .output()
        .unwrap();
    ok(&out, "mount --replica through the proxy");
    v.adopt_mount();
    std::fs::create_dir(v.path("d")).unwrap();
    write_fsync(&v.path("d/base"), &block(0, 1, 200_000));
    ok(
        &pairfs(&["split", v.path("d").to_str().unwrap(), "--wait"]),
        "split d",
    );
    // A writer: each file is fsync'd; `done` is the last one whose fsync returned.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (d2, root) = (done.clone(), v.mnt.clone());
    let w = std::thread::spawn(move || {
        for i in 1..100_000u64 {
            let p = root.join(format!("d/f{i}"));
            let Ok(mut f) = std::fs::File::create(&p) else {
                return;
            };
            if f.write_all(&block(i, 1, 20_000 + (i as usize % 7) * 9_000))
                .is_err()
                || f.sync_all().is_err()
            {
                return;
            }
            // Overwrite the base under the split (copy-on-write) now and then.
            if i % 5 == 0 {
                let Ok(mut b) = std::fs::OpenOptions::new()
                    .write(true)
                    .open(root.join("d/base"))
                else {
                    return;
                };
                if b.write_all(&block(0, i, 70_000)).is_err() || b.sync_all().is_err() {
                    return;
                }
            }
            d2.store(i, std::sync::atomic::Ordering::SeqCst);
        }
    });
    std::thread::sleep(Duration::from_millis(1500));
    // A partition (what is in flight is lost), then the primary dies: every fsync that
    // returned before the cut must be on the secondary.
    proxy.cut();
    let acked = done.load(std::sync::atomic::Ordering::SeqCst);
    v.kill9();
    let _ = w.join();
    assert!(acked > 5, "only {acked} fsyncs in 1.5 s");
    std::thread::sleep(Duration::from_millis(300));
    s.stop("-TERM");
    ok(
        &pairfs(&["replica", "promote", s.img.to_str().unwrap()]),
        "promote",
    );
    ok(
        &pairfs(&["fsck", s.img.to_str().unwrap()]),
        "fsck secondary after the primary's crash",
    );
    let smnt = v.dir.path().join("smnt");
    let scopy = v.dir.path().join("scopy");
    std::fs::create_dir_all(&smnt).unwrap();
    std::fs::create_dir_all(&scopy).unwrap();
    ok(
        &pairfs(&[
            "mount",
            s.img.to_str().unwrap(),
            smnt.to_str().unwrap(),
            "--copy-mount",
            scopy.to_str().unwrap(),
            "--daemon",
        ]),
        "mount the promoted secondary",
    );
    let mut bad = Vec::new();
    for i in 1..=acked {
        let want = block(i, 1, 20_000 + (i as usize % 7) * 9_000);
        if std::fs::read(smnt.join(format!("d/f{i}"))).ok().as_deref() != Some(&want[..]) {
            bad.push(i);
        }
    }
    // The frozen copy is the split's instant whatever happened after it.
    let frozen = std::fs::read(scopy.join("d/base"));
    let base_len = std::fs::metadata(smnt.join("d/base")).map(|m| m.len());
    ok(
        &pairfs(&["umount", smnt.to_str().unwrap()]),
        "umount secondary",
    );
    assert!(
        bad.is_empty(),
        "acknowledged files missing or wrong on the secondary: {bad:?}"
    );
    assert_eq!(frozen.unwrap(), block(0, 1, 200_000));
    assert!(base_len.unwrap() >= 70_000);
    ok(
        &pairfs(&["fsck", s.img.to_str().unwrap()]),
        "fsck secondary after its mount",
    );
}

fn wait_in_sync(mnt: &Path, what: &str) -> String {
    let t = Instant::now();
    loop {
        let line = replica_line(mnt);
        if line.starts_with("in_sync") {
            return line;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{what}: not back in sync: {line}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_outage_beyond_the_buffer_is_resynced_by_tracks_then_a_wiped_secondary_in_full() {
    let mut v = Vol::new("512M");
    let key = key_file(v.dir.path(), "key", "0123456789abcdef-resync");
    let mut s = Secondary::start(v.dir.path(), &key);
    let out = Command::new(BIN)
        .args(["mount", v.img.to_str().unwrap(), v.mnt.to_str().unwrap()])
        .args(["--copy-mount", v.copy.to_str().unwrap(), "--daemon"])
        .args(["--replica", &s.addr, "--key-file", key.to_str().unwrap()])
        .args(["--on-disconnect", "continue"])
        .env("PAIRFS_REPL_BUFFER", "1M")
        .env("PAIRFS_LOG_FILE", v.dir.path().join("primary.log"))
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    ok(&out, "mount with a 1 MiB replica buffer");
    v.adopt_mount();
    std::fs::create_dir(v.path("d")).unwrap();
    for i in 0..8u64 {
        write_fsync(&v.path(&format!("d/f{i}")), &block(i, 1, 300_000));
    }
    ok(
        &pairfs(&["split", v.path("d").to_str().unwrap(), "--wait"]),
        "split d",
    );
    s.stop("-9");
    // 6 MiB while the secondary is down: past the buffer, the stream is dropped and the
    // changed tracks are marked.
    for i in 0..8u64 {
        write_fsync(&v.path(&format!("d/f{i}")), &block(i, 2, 400_000));
    }
    write_fsync(&v.path("d/g"), &block(77, 1, 3 << 20));
    std::fs::remove_file(v.path("d/f7")).unwrap();
    let line = replica_line(&v.mnt);
    assert!(line.starts_with("out_of_sync"), "{line}");
    // Blocks of 4 KiB: about 6.5 MiB changed.
    let oos = common::field(&line, "out_of_sync_blocks").unwrap();
    assert!(oos > 1000 && oos < 4000, "{line}");
    s.restart();
    wait_in_sync(&v.mnt, "track resync");
    let log = std::fs::read_to_string(v.dir.path().join("primary.log")).unwrap();
    assert!(log.contains("resync of stream"), "{log}");
    assert!(
        !log.contains("begins: all blocks"),
        "a full resync where tracks would do: {log}"
    );
    ok(
        &pairfs(&["update", v.path("d").to_str().unwrap(), "--wait"]),
        "update d",
    );
    write_fsync(&v.path("d/f0"), &block(0, 3, 100_000));
    // A secondary that lost everything is resynced in full, online.
    s.stop("-9");
    for ext in ["", ".copy", ".meta", ".meta-wal", ".meta-shm"] {
        let _ = std::fs::remove_file(format!("{}{ext}", s.img.display()));
    }
    s.restart();
    let t = Instant::now();
    let plog = v.dir.path().join("primary.log");
    while !std::fs::read_to_string(&plog)
        .unwrap()
        .contains("begins: all blocks")
    {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no full resync began"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_in_sync(&v.mnt, "full resync");
    write_fsync(&v.path("d/after"), &block(5, 5, 10_000));
    stop_promote_and_compare(&mut v, &mut s);
}

#[test]
fn a_clean_remount_resumes_the_stream_without_a_full_sync() {
    let mut v = Vol::new("256M");
    let key = key_file(v.dir.path(), "key", "0123456789abcdef-resume");
    let mut s = Secondary::start(v.dir.path(), &key);
    let full_syncs = |s: &Secondary| s.log().matches("full sync from").count() / 2;
    ok(&mount_replica(&mut v, &s, &[]), "mount 1");
    write_fsync(&v.path("a"), &block(1, 1, 300_000));
    std::fs::create_dir(v.path("d")).unwrap();
    write_fsync(&v.path("d/x"), &block(2, 1, 100_000));
    ok(
        &pairfs(&["split", v.path("d").to_str().unwrap(), "--wait"]),
        "split d",
    );
    v.umount();
    assert_eq!(full_syncs(&s), 1);
    // Same secondary, clean stop: the stream goes on.
    ok(&mount_replica(&mut v, &s, &[]), "mount 2");
    write_fsync(&v.path("d/x"), &block(2, 2, 50_000));
    write_fsync(&v.path("b"), &block(3, 1, 70_000));
    v.umount();
    assert_eq!(full_syncs(&s), 1, "{}", s.log());
    // A mount without the replica changes the volume behind it: the next link syncs in full.
    v.mount();
    write_fsync(&v.path("c"), &block(4, 1, 90_000));
    v.umount();
    ok(&mount_replica(&mut v, &s, &[]), "mount 3");
    v.umount();
    assert_eq!(full_syncs(&s), 2, "{}", s.log());
    s.stop("-TERM");
    ok(
        &pairfs(&["replica", "promote", s.img.to_str().unwrap()]),
        "promote",
    );
    ok(
        &pairfs(&["fsck", s.img.to_str().unwrap()]),
        "fsck secondary",
    );
    let _ = compare_sides(&mut v, &s);
}

/// The block bytes the last resync of the primary's log sent.
fn last_resync_bytes(v: &Vol) -> u64 {
    resync_sent(&std::fs::read_to_string(v.dir.path().join("primary.log")).unwrap())
}

/// Bytes of block data the last resync in a primary's `log` sent.
fn resync_sent(log: &str) -> u64 {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("resync sent:"))
        .unwrap_or_else(|| panic!("no resync in {log}"));
    let (_, rest) = line.split_once("block data (").unwrap();
    rest.split_once(' ').unwrap().0.parse().unwrap()
}

/// What a full sync of volume `img` sends: the data (not the holes) of both images.
fn full_sync_bytes(img: &Path) -> u64 {
    [
        img.to_path_buf(),
        PathBuf::from(format!("{}.copy", img.display())),
    ]
    .iter()
    .map(|f| std::fs::metadata(f).unwrap().blocks() * 512)
    .sum()
}

/// The old primary's volume `v` served with `replica serve --rejoin` on `addr`.
fn serve_rejoin(v: &Vol, key: &Path, addr: String) -> Secondary {
    let mut p = Secondary {
        img: v.img.clone(),
        addr,
        key: key.to_path_buf(),
        log: v.dir.path().join("old-primary.log"),
        child: None,
        extra: vec!["--rejoin"],
    };
    p.restart();
    p
}

/// A failover: the primary `v` (mounted with `--replica` to `s`) writes a `big`-byte
/// file in a split directory `d`, and, once its bitmap checkpoints cleared those
/// regions, 20 fsync'd files (what it marks when it dies); then it is killed -9 and
/// `s` is stopped and promoted.
fn fail_over(v: &mut Vol, s: &mut Secondary, big: usize) {
    std::fs::create_dir(v.path("d")).unwrap();
    write_fsync(&v.path("d/big"), &block(1, 1, big));
    ok(
        &pairfs(&["split", v.path("d").to_str().unwrap(), "--wait"]),
        "split d",
    );
    wait_in_sync(&v.mnt, "before the crash");
    std::thread::sleep(Duration::from_millis(2500));
    for i in 0..20u64 {
        write_fsync(&v.path(&format!("d/f{i}")), &block(i, 3, 50_000));
    }
    v.kill9();
    s.stop("-TERM");
    ok(
        &pairfs(&["replica", "promote", s.img.to_str().unwrap()]),
        "promote S",
    );
}

/// Mounts the promoted `s` on `smnt` with `args` (its `--replica` link), logging to
/// `new-primary.log`.
fn mount_new_primary(
    v: &Vol,
    s: &Secondary,
    smnt: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> std::process::Output {
    std::fs::create_dir_all(smnt).unwrap();
    Command::new(BIN)
        .args([
            "mount",
            s.img.to_str().unwrap(),
            smnt.to_str().unwrap(),
            "--daemon",
        ])
        .args(args)
        .args(["--key-file", s.key.to_str().unwrap()])
        .env("PAIRFS_LOG_FILE", v.dir.path().join("new-primary.log"))
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// Writes on a new primary: a 2 MiB file, 100 4 KiB overwrites of `d/big` in its first
/// `span` blocks, a directory `e` split with a file in it.
fn write_on_new_primary(smnt: &Path, span: u64) {
    use std::os::unix::fs::FileExt;
    write_fsync(&smnt.join("d/on-s"), &block(5, 1, 2 << 20));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(smnt.join("d/big"))
        .unwrap();
    for i in 0..100u64 {
        f.write_all_at(&block(i, 9, 4096), (i * 37 % span) * 4096)
            .unwrap();
    }
    f.sync_all().unwrap();
    std::fs::create_dir(smnt.join("e")).unwrap();
    write_fsync(&smnt.join("e/x"), &block(6, 1, 100_000));
    ok(
        &pairfs(&["split", smnt.join("e").to_str().unwrap(), "--wait"]),
        "split e on S",
    );
}

/// A directory `d` of the primary `v` with a file `d/a` of `len` bytes, split (`--wait`).
fn split_dir_with_a_file(v: &Vol, len: usize) {
    std::fs::create_dir(v.path("d")).unwrap();
    write_fsync(&v.path("d/a"), &block(1, 1, len));
    ok(
        &pairfs(&["split", v.path("d").to_str().unwrap(), "--wait"]),
        "split d",
    );
}

/// A thread writing `d/f1` .. `d/fN` under `mnt`, `len` bytes each with an fsync; the
/// counter is the last file whose fsync returned.
fn fsync_writer(
    mnt: &Path,
    n: u64,
    len: usize,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicU64>,
    std::thread::JoinHandle<()>,
) {
    let done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (d2, root) = (done.clone(), mnt.to_path_buf());
    let w = std::thread::spawn(move || {
        for i in 1..=n {
            write_fsync(&root.join(format!("d/f{i}")), &block(i, 1, len));
            d2.store(i, std::sync::atomic::Ordering::SeqCst);
        }
    });
    (done, w)
}

/// Waits (up to `limit_s` seconds) until the writer of [`fsync_writer`] (`n` files)
/// stalls: no fsync returns for 2 s and the replica line of `mnt` says `why`. Returns
/// how many files it wrote; asserts the link is not in sync.
fn wait_stalled(
    done: &std::sync::atomic::AtomicU64,
    n: u64,
    mnt: &Path,
    limit_s: u64,
    why: impl Fn(&str) -> bool,
) -> u64 {
    let t = Instant::now();
    let mut last = (u64::MAX, Instant::now());
    loop {
        let d = done.load(std::sync::atomic::Ordering::SeqCst);
        assert!(
            d < n,
            "every fsync returned with the secondary unable to store"
        );
        if d != last.0 {
            last = (d, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(2) && why(&replica_line(mnt)) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(limit_s),
            "no stall: {}",
            replica_line(mnt)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let stalled = done.load(std::sync::atomic::Ordering::SeqCst);
    let line = replica_line(mnt);
    eprintln!("stalled after {stalled} files: {line}");
    assert!(!line.starts_with("in_sync"), "{line}");
    stalled
}

/// Waits (up to 60 s) until the writer of [`fsync_writer`] wrote its `n` files.
fn wait_writer(done: &std::sync::atomic::AtomicU64, n: u64, mnt: &Path) {
    let t = Instant::now();
    while done.load(std::sync::atomic::Ordering::SeqCst) < n {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the writer did not resume: {}",
            replica_line(mnt)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether the replica volume `img` is marked inconsistent (cut in an online resync).
fn cut_in_a_resync(img: &Path) -> bool {
    let c = rusqlite::Connection::open_with_flags(
        format!("{}.meta", img.display()),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    c.query_row(
        "SELECT value FROM super WHERE key = 'repl_inconsistent'",
        [],
        |r| r.get::<_, String>(0),
    )
    .is_ok()
}

/// The end of a replicated run: the primary unmounted, the secondary stopped and
/// promoted, fsck clean on both, files and frozen copies compared.
fn stop_promote_and_compare(v: &mut Vol, s: &mut Secondary) {
    v.umount();
    s.stop("-TERM");
    ok(
        &pairfs(&["replica", "promote", s.img.to_str().unwrap()]),
        "promote",
    );
    v.fsck();
    ok(
        &pairfs(&["fsck", s.img.to_str().unwrap()]),
        "fsck secondary",
    );
    let _ = compare_sides(v, s);
}

/// The end of a rejoin: the old primary `p` stopped and promoted, fsck clean on both,
/// files and frozen copies compared (returns the copy mount's tree).
fn promote_and_compare(v: &mut Vol, s: &Secondary, p: &mut Secondary) -> Vec<String> {
    p.stop("-TERM");
    ok(
        &pairfs(&["replica", "promote", v.img.to_str().unwrap()]),
        "promote the old primary",
    );
    v.fsck();
    ok(&pairfs(&["fsck", s.img.to_str().unwrap()]), "fsck S");
    compare_sides(v, s)
}

/// A primary in `continue` mode loses its secondary, changes `changed` bytes (4 KiB
/// overwrites spread over a 48 MiB file, and a new 1 MiB file), and is then stopped:
/// cleanly (`kill` false) or by kill -9 after its bitmap checkpoints ran. Its next
/// mount resyncs by the persistent bitmap: about the changed bytes go over, not the
/// volume; both sides end byte-identical, fsck clean.
fn stopped_out_of_sync_resyncs_by_bitmap(kill: bool) {
    let mut v = Vol::new("512M");
    let key = key_file(v.dir.path(), "key", "0123456789abcdef-bitmap");
    let mut s = Secondary::start(v.dir.path(), &key);
    let full_syncs = |s: &Secondary| s.log().matches("full sync from").count() / 2;
    ok(
        &mount_replica_env(
            &mut v,
            &s,
            &["--on-disconnect", "continue"],
            &[("PAIRFS_REPL_BUFFER", "1M")],
        ),
        "mount 1",
    );
    std::fs::create_dir(v.path("d")).unwrap();
    write_fsync(&v.path("d/big"), &block(1, 1, 48 << 20));
    write_fsync(&v.path("d/small"), &block(2, 1, 200_000));
    ok(
        &pairfs(&["split", v.path("d").to_str().unwrap(), "--wait"]),
        "split d",
    );
    wait_in_sync(&v.mnt, "before the outage");
    s.stop("-9");
    // 600 overwrites of 4 KiB at scattered offsets (some twice), and a new file.
    let mut changed = std::collections::BTreeSet::new();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(v.path("d/big"))
            .unwrap();
        let mut x = 12345u64;
        for i in 0..600u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let blk = (x >> 33) % ((48 << 20) / 4096);
            f.write_all_at(&block(blk, 2 + i, 4096), blk * 4096)
                .unwrap();
            changed.insert(blk);
        }
        f.sync_all().unwrap();
    }
    write_fsync(&v.path("d/new"), &block(3, 1, 1 << 20));
    let changed = changed.len() as u64 * 4096 + (1 << 20);
    let line = replica_line(&v.mnt);
    assert!(line.starts_with("out_of_sync"), "{line}");
    if kill {
        // Two checkpoints: the fine bits are on disk, the written regions left the
        // activity log.
        std::thread::sleep(Duration::from_millis(3000));
        v.kill9();
    } else {
        v.umount();
    }
    assert!(
        std::fs::metadata(format!("{}.meta.repl-bitmap", v.img.display())).is_ok(),
        "no bitmap file"
    );
    s.restart();
    let out = mount_replica(&mut v, &s, &["--on-disconnect", "continue"]);
    ok(&out, "mount 2");
    wait_in_sync(&v.mnt, "resync by bitmap");
    // Said at mount, before the daemon's log file is open.
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("resync by bitmap"), "{said}");
    assert_eq!(full_syncs(&s), 1, "{}", s.log());
    let sent = last_resync_bytes(&v);
    assert!(
        sent >= changed && sent <= changed + changed / 10 + (256 << 10),
        "resync sent {sent} bytes for {changed} changed"
    );
    write_fsync(&v.path("d/after"), &block(4, 1, 30_000));
    stop_promote_and_compare(&mut v, &mut s);
}

#[test]
fn a_primary_stopped_out_of_sync_resyncs_by_its_bitmap() {
    stopped_out_of_sync_resyncs_by_bitmap(false);
}

#[test]
fn a_primary_killed_out_of_sync_resyncs_by_its_bitmap() {
    stopped_out_of_sync_resyncs_by_bitmap(true);
}

#[test]
fn a_primary_killed_while_connected_resyncs_its_activity_log_not_everything() {
    let _heavy = heavy();
    let mut v = Vol::new("512M");
    let key = key_file(v.dir.path(), "key", "0123456789abcdef-al");
    let mut s = Secondary::start(v.dir.path(), &key);
    let full_syncs = |s: &Secondary| s.log().matches("full sync from").count() / 2;
    ok(&mount_replica(&mut v, &s, &[]), "mount 1");
    std::fs::create_dir(v.path("d")).unwrap();
    write_fsync(&v.path("d/big"), &block(1, 1, 64 << 20));
    ok(
        &pairfs(&["split", v.path("d").to_str().unwrap(), "--wait"]),
        "split d",
    );
    // The big file's and its copy's regions leave the activity log once their records
    // are acked and synced (a checkpoint a second); on a loaded machine that can take a
    // while, and what this test measures is the log of the writer below only.
    let t = std::time::Instant::now();
    loop {
        let line = replica_line(&v.mnt);
        let regions = line
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("bitmap_regions="))
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no bitmap_regions in {line}"));
        if regions <= 2 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the log stays at {line}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // A writer in sync mode, killed with the primary mid-stream.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (d2, root) = (done.clone(), v.mnt.clone());
    let w = std::thread::spawn(move || {
        for i in 1..100_000u64 {
            let p = root.join(format!("d/f{}", i % 50));
            let Ok(mut f) = std::fs::File::create(&p) else {
                return;
            };
            if f.write_all(&block(i, 1, 30_000)).is_err() || f.sync_all().is_err() {
                return;
            }
            d2.store(i, std::sync::atomic::Ordering::SeqCst);
        }
    });
    std::thread::sleep(Duration::from_millis(1500));
    v.kill9();
    let _ = w.join();
    assert!(done.load(std::sync::atomic::Ordering::SeqCst) > 5);
    let out = mount_replica(&mut v, &s, &[]);
    ok(&out, "mount 2");
    wait_in_sync(&v.mnt, "resync by activity log");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("resync by bitmap"), "{said}");
    assert_eq!(full_syncs(&s), 1, "{}", s.log());
    // The 4 MiB regions the writer marked in its last second or two (each new region
    // with the ones after it, for sequential writers): 7 to 33 MiB on a quiet machine, up
    // to 91 MiB on a loaded one (checkpoints retire regions later). Less than a full sync
    // in any case, which sends the 64 MiB file and its 64 MiB frozen copy at least.
    let sent = last_resync_bytes(&v);
    eprintln!("activity-log resync sent {sent} bytes");
    assert!(sent < 128 << 20, "resync sent {sent} bytes");
    stop_promote_and_compare(&mut v, &mut s);
}

/// A small tmpfs (the secondary's disk), unmounted when dropped.
struct SmallDisk {
    dir: PathBuf,
}

impl SmallDisk {
    fn new(name: &str, size: &str) -> SmallDisk {
        let dir = PathBuf::from(format!("/tmp/repl2-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .output()
            .unwrap();
        ok(&out, "mount a small tmpfs");
        SmallDisk { dir }
    }

    fn grow(&self, size: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.dir)
            .output()
            .unwrap();
        ok(&out, "grow the tmpfs");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).output();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[test]
fn a_full_secondary_disk_with_continue_leaves_the_primary_serving_then_catches_up() {
    let disk = SmallDisk::new("full-continue", "24M");
    let mut v = Vol::new("256M");
    let key = key_file(v.dir.path(), "key", "0123456789abcdef-full");
    let mut s = Secondary::start_in(&disk.dir, v.dir.path(), &key);
    ok(
        &mount_replica_env(
            &mut v,
            &s,
            &["--on-disconnect", "continue"],
            &[("PAIRFS_REPL_BUFFER", "4M")],
        ),
        "mount",
    );
    split_dir_with_a_file(&v, 2 << 20);
    // 40 MiB on a 24 MiB disk: the secondary fails its writes; every write and fsync
    // here still returns.
    let t = Instant::now();
    for i in 0..10u64 {
        write_fsync(&v.path(&format!("d/f{i}")), &block(10 + i, 1, 4 << 20));
    }
    write_fsync(&v.path("d/a"), &block(1, 2, 1 << 20));
    assert!(t.elapsed() < Duration::from_secs(60), "{:?}", t.elapsed());
    let line = replica_line(&v.mnt);
    assert!(!line.starts_with("in_sync"), "{line}");
    let slog = s.log();
    assert!(
        slog.contains("No space left") || slog.contains("full"),
        "the secondary did not hit the full disk: {slog}"
    );
    assert!(s.alive(), "the secondary died on a full disk");
    for i in 0..10u64 {
        assert_eq!(
            std::fs::read(v.path(&format!("d/f{i}"))).unwrap(),
            block(10 + i, 1, 4 << 20)
        );
    }
    // Space again: the link catches up (replay or resync) by itself.
    disk.grow("400M");
    wait_in_sync(&v.mnt, "after the disk grew");
    write_fsync(&v.path("d/after"), &block(5, 1, 50_000));
    stop_promote_and_compare(&mut v, &mut s);
}

#[test]
fn a_full_secondary_disk_with_block_stalls_fsync_until_space_is_freed() {
    let disk = SmallDisk::new("full-block", "24M");
    let mut v = Vol::new("256M");
    let key = key_file(v.dir.path(), "key", "0123456789abcdef-fullblock");
    let mut s = Secondary::start_in(&disk.dir, v.dir.path(), &key);
    ok(&mount_replica(&mut v, &s, &[]), "mount (sync, block)");
    split_dir_with_a_file(&v, 100_000);
    // fsync'd 2 MiB files; `done` is the last whose fsync returned.
    let (done, w) = fsync_writer(&v.mnt, 20u64, 2 << 20);
    // The disk fills at about 10 files: the secondary refuses for lack of space and the
    // writer stalls there.
    let stalled = wait_stalled(&done, 20, &v.mnt, 90, |l| l.contains("No space left"));
    assert!(s.alive(), "the secondary died on a full disk");
    // Space again: the writer resumes and finishes.
    disk.grow("400M");
    wait_writer(&done, 20, &v.mnt);
    w.join().unwrap();
    assert!(stalled >= 1, "stalled after {stalled} files");
    stop_promote_and_compare(&mut v, &mut s);
}

/// A TCP proxy that misbehaves on demand: cuts every open connection at once (bytes in
/// flight are lost), refuses the link for a while (accepts and closes at once), and
/// flips one bit of what the primary sends (the frame checksum must catch it).
struct Chaos {
    addr: String,
    conns: std::sync::Arc<std::sync::Mutex<Vec<TcpStream>>>,
    down_until: std::sync::Arc<std::sync::Mutex<Instant>>,
    corrupt: std::sync::Arc<std::sync::atomic::AtomicU64>,
    cuts: std::sync::atomic::AtomicU64,
    /// Bytes per second the primary may send (0: no limit).
    rate: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Chaos {
    fn start(target: &str) -> Chaos {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::{Arc, Mutex};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let down_until = Arc::new(Mutex::new(Instant::now()));
        let corrupt = Arc::new(AtomicU64::new(0));
        let rate = Arc::new(AtomicU64::new(0));
        let (c2, d2, k2, r2, target) = (
            conns.clone(),
            down_until.clone(),
            corrupt.clone(),
            rate.clone(),
            target.to_string(),
        );
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(c) = c else { return };
                if Instant::now() < *d2.lock().unwrap() {
                    let _ = c.shutdown(std::net::Shutdown::Both);
                    continue;
                }
                let Ok(u) = TcpStream::connect(&target) else {
                    continue;
                };
                {
                    let mut g = c2.lock().unwrap();
                    g.push(c.try_clone().unwrap());
                    g.push(u.try_clone().unwrap());
                }
                let pairs = [
                    (c.try_clone().unwrap(), u.try_clone().unwrap(), true),
                    (u, c, false),
                ];
                for (mut from, mut to, upstream) in pairs {
                    let k = k2.clone();
                    let rate = r2.clone();
                    std::thread::spawn(move || {
                        let mut b = vec![0u8; 1 << 16];
                        loop {
                            // Under a rate, chunks of at most a tenth of a second's worth:
                            // a slow link does not let one large chunk through at once.
                            let r = rate.load(Ordering::SeqCst);
                            let cap = if upstream && r > 0 {
                                (r as usize / 10).clamp(64, b.len())
                            } else {
                                b.len()
                            };
                            let n = match from.read(&mut b[..cap]) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            if upstream
                                && n >= 64
                                && k.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |x| {
                                    x.checked_sub(1)
                                })
                                .is_ok()
                            {
                                b[n - 1 - n / 3] ^= 0x10;
                            }
                            if to.write_all(&b[..n]).is_err() {
                                break;
                            }
                            let r = rate.load(Ordering::SeqCst);
                            if upstream && r > 0 {
                                std::thread::sleep(Duration::from_secs_f64(n as f64 / r as f64));
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                        let _ = from.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Chaos {
            addr,
            conns,
            down_until,
            corrupt,
            cuts: AtomicU64::new(0),
            rate,
        }
    }

    /// Cuts every open connection.
    fn cut(&self) {
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        self.cuts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// Cuts, and refuses the link for `d`.
    fn down(&self, d: Duration) {
        *self.down_until.lock().unwrap() = Instant::now() + d;
        self.cut();
    }

    /// Flips one bit in the next chunk the primary sends.
    fn corrupt_one(&self) {
        self.corrupt
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn a_link_cut_at_random_moments_loses_nothing_acknowledged_and_converges() {
    let mut v = Vol::new("512M");
    let key = key_file(v.dir.path(), "key", "0123456789abcdef-chaos");
    let mut s = Secondary::start(v.dir.path(), &key);
    let chaos = Chaos::start(&s.addr);
    let out = Command::new(BIN)
        .args(["mount", v.img.to_str().unwrap(), v.mnt.to_str().unwrap()])
        .args(["--copy-mount", v.copy.to_str().unwrap(), "--daemon"])
        .args([
            "--replica",
            &chaos.addr,
            "--key-file",
            key.to_str().unwrap(),
        ])
        .env("PAIRFS_LOG_FILE", v.dir.path().join("primary.log"))
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    ok(
        &out,
        "mount --replica through the chaos proxy (sync, block)",
    );
    v.adopt_mount();
    std::fs::create_dir(v.path("d")).unwrap();
    write_fsync(&v.path("d/base"), &block(0, 1, 300_000));
    ok(
        &pairfs(&["split", v.path("d").to_str().unwrap(), "--wait"]),
        "split d",
    );
    // A writer: fsync'd files, and now and then an overwrite of the split's base
    // (copy-on-write); `done` is the last file whose fsync returned.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (d2, root) = (done.clone(), v.mnt.clone());
    let w = std::thread::spawn(move || {
        for i in 1..1_000_000u64 {
            let p = root.join(format!("d/f{}", i % 300));
            let Ok(mut f) = std::fs::File::create(&p) else {
                return;
            };
            if f.write_all(&block(i, 1, 20_000 + (i as usize % 5) * 11_000))
                .is_err()
                || f.sync_all().is_err()
            {
                return;
            }
            if i % 7 == 0 {
                let Ok(mut b) = std::fs::OpenOptions::new()
                    .write(true)
                    .open(root.join("d/base"))
                else {
                    return;
                };
                if b.write_all(&block(0, i, 50_000)).is_err() || b.sync_all().is_err() {
                    return;
                }
            }
            d2.store(i, std::sync::atomic::Ordering::SeqCst);
        }
    });
    // 8 s of trouble: cuts, the link down for up to 1.5 s, flipped bits.
    let mut x = 0x2545F4914F6CDD1Du64;
    let mut rnd = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let t = Instant::now();
    let mut progress = vec![];
    while t.elapsed() < Duration::from_secs(8) {
        std::thread::sleep(Duration::from_millis(150 + rnd(450)));
        // A flipped bit first: the checksum must catch it.
        match if progress.is_empty() { 9 } else { rnd(10) } {
            0..=5 => chaos.cut(),
            6 | 7 => chaos.down(Duration::from_millis(300 + rnd(1200))),
            _ => chaos.corrupt_one(),
        }
        progress.push(done.load(std::sync::atomic::Ordering::SeqCst));
    }
    // Calm: the writer goes on (fsyncs wait for the link, `block`).
    let before = done.load(std::sync::atomic::Ordering::SeqCst);
    let t = Instant::now();
    while done.load(std::sync::atomic::Ordering::SeqCst) < before + 20 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no progress after the trouble: {}",
            replica_line(&v.mnt)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let line = replica_line(&v.mnt);
    assert!(
        common::field(line.trim(), "reconnects").unwrap() >= 5,
        "{line}"
    );
    // Then a partition and the primary's death: every fsync that returned before the
    // cut is on the secondary.
    chaos.down(Duration::from_secs(3600));
    let acked = done.load(std::sync::atomic::Ordering::SeqCst);
    v.kill9();
    let _ = w.join();
    eprintln!(
        "{} cuts, {acked} fsync'd files, progress {progress:?}",
        chaos.cuts.load(std::sync::atomic::Ordering::SeqCst)
    );
    s.stop("-TERM");
    // Check a copy of the secondary (promoted); the secondary itself stays a replica.
    let cp = v.dir.path().join("check.img");
    for ext in ["", ".copy", ".meta", ".meta-wal", ".meta-shm"] {
        let from = format!("{}{ext}", s.img.display());
        if Path::new(&from).exists() {
            let out = Command::new("cp")
                .args(["--sparse=always", &from, &format!("{}{ext}", cp.display())])
                .output()
                .unwrap();
            ok(&out, "copy the secondary");
        }
    }
    ok(
        &pairfs(&["replica", "promote", cp.to_str().unwrap()]),
        "promote the copy",
    );
    ok(
        &pairfs(&["fsck", cp.to_str().unwrap()]),
        "fsck the secondary's copy",
    );
    let cmnt = v.dir.path().join("cmnt");
    std::fs::create_dir_all(&cmnt).unwrap();
    ok(
        &pairfs(&[
            "mount",
            cp.to_str().unwrap(),
            cmnt.to_str().unwrap(),
            "--daemon",
        ]),
        "mount the secondary's copy",
    );
    let mut bad = Vec::new();
    // The last 300 acked files (each name is rewritten every 300).
    for i in acked.saturating_sub(299).max(1)..=acked {
        let want = block(i, 1, 20_000 + (i as usize % 5) * 11_000);
        if std::fs::read(cmnt.join(format!("d/f{}", i % 300)))
            .ok()
            .as_deref()
            != Some(&want[..])
        {
            bad.push(i);
        }
    }
    ok(&pairfs(&["umount", cmnt.to_str().unwrap()]), "umount copy");
    assert!(bad.is_empty(), "acknowledged files lost: {bad:?}");
    // The sides converge: the primary remounts (resync by its bitmap) and both end
    // byte-identical.
    s.restart();
    *chaos.down_until.lock().unwrap() = Instant::now();
    let out = Command::new(BIN)
        .args(["mount", v.img.to_str().unwrap(), v.mnt.to_str().unwrap()])
        .args(["--copy-mount", v.copy.to_str().unwrap(), "--daemon"])
        .args([
            "--replica",
            &chaos.addr,
            "--key-file",
            key.to_str().unwrap(),
        ])
        .env("PAIRFS_LOG_FILE", v.dir.path().join("primary.log"))
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    ok(&out, "remount the primary");
    v.adopt_mount();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("resync by bitmap"), "{said}");
    wait_in_sync(&v.mnt, "after the crash");
    let slog = s.log();
    let mismatches = slog.matches("checksum mismatch").count();
    eprintln!("secondary: {mismatches} checksum mismatches");
    assert!(mismatches > 0, "the flipped bit went unnoticed: {slog}");
    write_fsync(&v.path("d/after"), &block(9, 9, 10_000));
    stop_promote_and_compare(&mut v, &mut s);
}

#[test]
fn a_promoted_secondary_serves_the_root_instant_with_mount_snapshot() {
    let mut v = Vol::new("256M");
    let key = key_file(v.dir.path(), "key", "0123456789abcdef-snapshot");
    let mut s = Secondary::start(v.dir.path(), &key);
    ok(&mount_replica(&mut v, &s, &[]), "mount");
    std::fs::create_dir_all(v.path("t/sub")).unwrap();
    for i in 0..12u64 {
        write_fsync(
            &v.path(&format!("t/f{i}")),
            &block(i, 1, 5_000 + i as usize * 40_000),
        );
    }
    write_fsync(&v.path("t/sub/big"), &block(50, 1, 2 << 20));
    std::os::unix::fs::symlink("f1", v.path("t/link")).unwrap();
    let instant = tree(&v.mnt);
    ok(
        &pairfs(&["split", v.mnt.to_str().unwrap(), "--wait"]),
        "split the root",
    );
    // Changed after the instant: overwritten (copy-on-write), removed, renamed, new.
    write_fsync(&v.path("t/f0"), &block(0, 2, 300_000));
    std::fs::remove_file(v.path("t/f3")).unwrap();
    std::fs::rename(v.path("t/f4"), v.path("t/f4-renamed")).unwrap();
    write_fsync(&v.path("t/sub/big"), &block(50, 2, 1 << 20));
    write_fsync(&v.path("t/new"), &block(60, 1, 70_000));
    let live = tree(&v.mnt);
    assert_ne!(live, instant);
    v.umount();
    s.stop("-TERM");
    ok(
        &pairfs(&["replica", "promote", s.img.to_str().unwrap()]),
        "promote",
    );
    let snap = v.dir.path().join("ssnap");
    std::fs::create_dir_all(&snap).unwrap();
    ok(
        &pairfs(&[
            "mount-snapshot",
            s.img.to_str().unwrap(),
            snap.to_str().unwrap(),
            "--daemon",
        ]),
        "mount-snapshot on the promoted secondary",
    );
    let got = tree(&snap);
    ok(
        &pairfs(&["umount", snap.to_str().unwrap()]),
        "umount snapshot",
    );
    assert_eq!(got, instant, "the secondary's snapshot is not the instant");
    // And its live tree is the primary's.
    let smnt = v.dir.path().join("smnt");
    std::fs::create_dir_all(&smnt).unwrap();
    ok(
        &pairfs(&[
            "mount",
            s.img.to_str().unwrap(),
            smnt.to_str().unwrap(),
            "--daemon",
        ]),
        "mount the promoted secondary",
    );
    let slive = tree(&smnt);
    ok(
        &pairfs(&["umount", smnt.to_str().unwrap()]),
        "umount secondary",
    );
    assert_eq!(slive, live);
    ok(
        &pairfs(&["fsck", s.img.to_str().unwrap()]),
        "fsck secondary",
    );
}

#[test]
fn a_primary_killed_during_a_resync_resyncs_by_its_bitmap_again() {
    let mut v = Vol::new("512M");
    let key = key_file(v.dir.path(), "key", "0123456789abcdef-cut-resync");
    let mut s = Secondary::start(v.dir.path(), &key);
    let chaos = Chaos::start(&s.addr);
    let full_syncs = |s: &Secondary| s.log().matches("full sync from").count() / 2;
    let mount = |v: &mut Vol, addr: &str| {
        let out = Command::new(BIN)
            .args(["mount", v.img.to_str().unwrap(), v.mnt.to_str().unwrap()])
            .args(["--copy-mount", v.copy.to_str().unwrap(), "--daemon"])
            .args(["--replica", addr, "--key-file", key.to_str().unwrap()])
            .args(["--on-disconnect", "continue"])
            .env("PAIRFS_REPL_BUFFER", "1M")
            .env("PAIRFS_LOG_FILE", v.dir.path().join("primary.log"))
            .env("RUST_LOG", "info")
            .output()
            .unwrap();
        ok(&out, "mount --replica, continue");
        v.adopt_mount();
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    mount(&mut v, &chaos.addr);
    std::fs::create_dir(v.path("d")).unwrap();
    write_fsync(&v.path("d/base"), &block(1, 1, 64 << 20));
    for i in 0..4u64 {
        write_fsync(&v.path(&format!("d/s{i}")), &block(10 + i, 1, 30_000));
    }
    ok(
        &pairfs(&["split", v.path("d").to_str().unwrap(), "--wait"]),
        "split d",
    );
    wait_in_sync(&v.mnt, "before the outage");
    // An outage with 24 MiB changed, then a slow link (4 MiB/s): the resync takes ~6 s.
    chaos.down(Duration::from_secs(3600));
    write_fsync(&v.path("d/new"), &block(2, 1, 24 << 20));
    let t = Instant::now();
    while !replica_line(&v.mnt).starts_with("out_of_sync") {
        assert!(t.elapsed() < Duration::from_secs(30), "not out of sync");
        std::thread::sleep(Duration::from_millis(50));
    }
    chaos
        .rate
        .store(4 << 20, std::sync::atomic::Ordering::SeqCst);
    *chaos.down_until.lock().unwrap() = Instant::now();
    let plog = v.dir.path().join("primary.log");
    let t = Instant::now();
    while !std::fs::read_to_string(&plog)
        .unwrap()
        .contains("resync of stream")
    {
        assert!(t.elapsed() < Duration::from_secs(30), "no resync began");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(1500));
    // Cut in the middle of it: once back, the secondary (inconsistent, same stream) is
    // resynced by the marks again, not in full.
    let line = replica_line(&v.mnt);
    assert!(line.starts_with("resyncing"), "{line}");
    chaos.down(Duration::from_millis(500));
    let t = Instant::now();
    while std::fs::read_to_string(&plog)
        .unwrap()
        .matches("resync of stream")
        .count()
        < 2
    {
        assert!(t.elapsed() < Duration::from_secs(30), "no second resync");
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = std::fs::read_to_string(&plog).unwrap();
    assert!(!log.contains("begins: all blocks"), "{log}");
    std::thread::sleep(Duration::from_millis(1500));
    // Cut again, and the primary dies in the middle of that resync.
    let line = replica_line(&v.mnt);
    assert!(line.starts_with("resyncing"), "{line}");
    chaos.down(Duration::from_secs(3600));
    v.kill9();
    assert!(
        cut_in_a_resync(&s.img),
        "the secondary is not in a cut resync"
    );
    // Straight to the secondary: the bitmap still holds the resync's marks.
    let said = mount(&mut v, &s.addr.clone());
    assert!(said.contains("resync by bitmap"), "{said}");
    wait_in_sync(&v.mnt, "second resync");
    assert_eq!(full_syncs(&s), 1, "{}", s.log());
    let sent = last_resync_bytes(&v);
    // The new file's blocks (and regions active at the crash), not the 64 MiB base and
    // its frozen copy.
    assert!(
        (24 << 20..40 << 20).contains(&sent),
        "resync sent {sent} bytes"
    );
    stop_promote_and_compare(&mut v, &mut s);
}

/// Failover and back: the primary P is killed -9 while connected under fsync'd writes;
/// its secondary S is promoted and mounted read-write with `--replica` to P served with
/// `--rejoin`. S sends P only the blocks P's bitmap marks (those it may have written
/// that S never got) and those S changed since promotion, plus the database: far less
/// than a full sync. After a clean stop both sides are byte-identical, fsck clean; a
/// plain old primary (no `--rejoin`) is still refused.
#[test]
fn an_old_primary_rejoins_the_promoted_secondary_by_bitmap() {
    let _heavy = heavy();
    let mut v = Vol::new("512M");
    let key = key_file(v.dir.path(), "key", "0123456789abcdef-rejoin");
    let mut s = Secondary::start(v.dir.path(), &key);
    ok(&mount_replica(&mut v, &s, &[]), "mount P");
    std::fs::create_dir(v.path("d")).unwrap();
    write_fsync(&v.path("d/big"), &block(1, 1, 64 << 20));
    write_fsync(&v.path("d/small"), &block(2, 1, 300_000));
    ok(
        &pairfs(&["split", v.path("d").to_str().unwrap(), "--wait"]),
        "split d",
    );
    wait_in_sync(&v.mnt, "before the crash");
    // Checkpoints of P's bitmap clear the regions of the big file from its activity log.
    std::thread::sleep(Duration::from_millis(3000));
    // A writer of fsync'd files and copy-on-write overwrites, killed with P.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (d2, root) = (done.clone(), v.mnt.clone());
    let w = std::thread::spawn(move || {
        use std::os::unix::fs::FileExt;
        for i in 1..100_000u64 {
            let p = root.join(format!("d/f{}", i % 40));
            let Ok(mut f) = std::fs::File::create(&p) else {
                return;
            };
            if f.write_all(&block(i, 1, 30_000)).is_err() || f.sync_all().is_err() {
                return;
            }
            let Ok(b) = std::fs::OpenOptions::new()
                .write(true)
                .open(root.join("d/big"))
            else {
                return;
            };
            // Within the first 8 MiB: the activity log marks the regions written.
            let at = (i * 7919 % 2048) * 4096;
            if b.write_all_at(&block(i, 2, 4096), at).is_err() || b.sync_all().is_err() {
                return;
            }
            d2.store(i, std::sync::atomic::Ordering::SeqCst);
        }
    });
    std::thread::sleep(Duration::from_millis(1500));
    v.kill9();
    let _ = w.join();
    assert!(done.load(std::sync::atomic::Ordering::SeqCst) > 5);
    s.stop("-TERM");
    ok(
        &pairfs(&["replica", "promote", s.img.to_str().unwrap()]),
        "promote S",
    );
    assert!(
        std::fs::metadata(format!("{}.meta.repl-bitmap", s.img.display())).is_ok(),
        "promote made no bitmap"
    );
    // P's volume, served as a secondary: refused without --rejoin, taken with it.
    let p_addr = format!("127.0.0.1:{}", free_port());
    let plain = pairfs(&[
        "replica",
        "serve",
        v.img.to_str().unwrap(),
        "--listen",
        &p_addr,
        "--key-file",
        key.to_str().unwrap(),
    ]);
    assert!(!plain.status.success());
    assert!(
        String::from_utf8_lossy(&plain.stderr).contains("--rejoin"),
        "{}",
        String::from_utf8_lossy(&plain.stderr)
    );
    let mut p = serve_rejoin(&v, &key, p_addr);
    // S is the primary now.
    let smnt = v.dir.path().join("smnt");
    let scopy = v.dir.path().join("scopy");
    std::fs::create_dir_all(&scopy).unwrap();
    let out = mount_new_primary(
        &v,
        &s,
        &smnt,
        &[
            "--copy-mount",
            scopy.to_str().unwrap(),
            "--replica",
            &p.addr,
        ],
        &[],
    );
    ok(&out, "mount S with --replica to the old primary");
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        said.contains("rejoins as the secondary") && said.contains("resync by bitmap"),
        "{said}"
    );
    // New writes on S: a new file, overwrites of the big file, a split of another dir.
    write_on_new_primary(&smnt, 16_000);
    write_fsync(&smnt.join("e/x"), &block(6, 2, 50_000));
    wait_in_sync(&smnt, "the old primary rejoined");
    let plog = p.log();
    assert!(!plog.contains("full sync"), "{plog}");
    assert!(plog.contains("took the database"), "{plog}");
    // What P marked: its log says the bytes of its runs.
    let marked: u64 = plog
        .lines()
        .find(|l| l.contains("marked runs ("))
        .and_then(|l| {
            l.split_once("marked runs (")?
                .1
                .split_once(' ')?
                .0
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no marks in {plog}"));
    let sent = resync_sent(&std::fs::read_to_string(v.dir.path().join("new-primary.log")).unwrap());
    eprintln!("rejoin: P marked {marked} bytes; the resync sent {sent} bytes of blocks");
    // The resync sends P's marks and the blocks S wrote since its promotion that were
    // not records of the stream: those written between its mount (repair of the
    // crashed volume included) and the start of the resync, at most the 2.7 MiB the
    // test writes on S plus the repair; and well below a full sync.
    let on_s = (2 << 20) + 100 * 4096 + 150_000 + (1 << 20);
    assert!(
        sent <= marked + on_s,
        "sent {sent} > marked {marked} + written on S {on_s}"
    );
    let full = full_sync_bytes(&s.img);
    eprintln!("rejoin: a full sync would send about {full} bytes");
    assert!(
        sent * 2 < full,
        "resync sent {sent} bytes, a full sync {full}"
    );
    ok(&pairfs(&["umount", smnt.to_str().unwrap()]), "umount S");
    // Both sides: live trees and frozen copies byte-identical.
    let ca = promote_and_compare(&mut v, &s, &mut p);
    assert!(ca.iter().any(|l| l.starts_with("e/x ")), "{ca:?}");
}

/// The rejoin falls back to a full sync, saying so, when the bitmaps do not line up:
/// here the promoted secondary was mounted without `--replica` first (its bitmap is
/// gone). Both sides still end identical.
#[test]
fn a_rejoin_that_does_not_line_up_is_a_full_sync() {
    let _heavy = heavy();
    let mut v = Vol::new("256M");
    let key = key_file(v.dir.path(), "key", "0123456789abcdef-rejoin-full");
    let mut s = Secondary::start(v.dir.path(), &key);
    ok(&mount_replica(&mut v, &s, &[]), "mount P");
    split_dir_with_a_file(&v, 2 << 20);
    write_fsync(&v.path("d/a"), &block(1, 2, 1 << 20));
    wait_in_sync(&v.mnt, "before the crash");
    v.kill9();
    s.stop("-TERM");
    ok(
        &pairfs(&["replica", "promote", s.img.to_str().unwrap()]),
        "promote S",
    );
    // A mount without --replica: S changes behind any bitmap (and deletes it).
    let smnt = v.dir.path().join("smnt");
    std::fs::create_dir_all(&smnt).unwrap();
    ok(
        &pairfs(&[
            "mount",
            s.img.to_str().unwrap(),
            smnt.to_str().unwrap(),
            "--daemon",
        ]),
        "mount S alone",
    );
    write_fsync(&smnt.join("d/alone"), &block(7, 1, 300_000));
    ok(&pairfs(&["umount", smnt.to_str().unwrap()]), "umount S");
    let mut p = serve_rejoin(&v, &key, format!("127.0.0.1:{}", free_port()));
    let out = mount_new_primary(&v, &s, &smnt, &["--replica", &p.addr], &[]);
    ok(&out, "mount S with --replica to the old primary");
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(said.contains("do not line up, full sync"), "{said}");
    assert!(!said.contains("resync by bitmap"), "{said}");
    write_fsync(&smnt.join("d/after"), &block(8, 1, 100_000));
    wait_in_sync(&smnt, "full sync of the old primary");
    ok(&pairfs(&["umount", smnt.to_str().unwrap()]), "umount S");
    p.stop("-TERM");
    assert!(p.log().contains("full sync from"), "{}", p.log());
    let _ = promote_and_compare(&mut v, &s, &mut p);
}

/// A rejoin cut before the old primary took the new primary's database (the old
/// primary's `replica serve` killed -9 while the resync's first records are still in a
/// 1 s delay proxy). The new primary goes on alone (`continue`, past a 1 MiB buffer:
/// its writes become marks) and stops; its next mount rejoins the restarted old
/// primary by both bitmaps (its own marks, the old primary's again), no full sync, and
/// both sides end identical.
#[test]
fn a_rejoin_cut_before_the_database_rejoins_again_by_bitmap() {
    let _heavy = heavy();
    let mut v = Vol::new("256M");
    let key = key_file(v.dir.path(), "key", "0123456789abcdef-rejoin-cut");
    let mut s = Secondary::start(v.dir.path(), &key);
    ok(&mount_replica(&mut v, &s, &[]), "mount P");
    fail_over(&mut v, &mut s, 16 << 20);
    let mut p = serve_rejoin(&v, &key, format!("127.0.0.1:{}", free_port()));
    let proxy = Proxy::start(&p.addr, Duration::from_millis(1000));
    let smnt = v.dir.path().join("smnt");
    let out = mount_new_primary(
        &v,
        &s,
        &smnt,
        &["--replica", &proxy.addr, "--on-disconnect", "continue"],
        &[("PAIRFS_REPL_BUFFER", "1M")],
    );
    // The resync's first records are a second away from the old primary: kill it now.
    p.stop("-9");
    ok(&out, "mount S with --replica to the old primary");
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(said.contains("resync by bitmap"), "{said}");
    let plog = p.log();
    assert!(!plog.contains("took the database"), "{plog}");
    // S goes on alone past its buffer (its writes become marks of its bitmap), and
    // stops cleanly: its next mount rejoins the old primary with both sides' marks.
    write_fsync(&smnt.join("d/alone"), &block(9, 1, 3 << 20));
    ok(
        &pairfs(&["umount", smnt.to_str().unwrap()]),
        "umount S alone",
    );
    p.restart();
    let out = mount_new_primary(&v, &s, &smnt, &["--replica", &proxy.addr], &[]);
    ok(&out, "mount S again with --replica to the old primary");
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    let here: u64 = said
        .split_once("blocks of 4096 bytes (")
        .and_then(|(_, r)| r.split_once(' ')?.0.parse().ok())
        .unwrap_or_else(|| panic!("{said}"));
    // S's own marks: at least the 3 MiB written alone.
    assert!(here >= (3 << 20) / 4096, "{said}");
    wait_in_sync(&smnt, "the old primary rejoined after a cut");
    write_fsync(&smnt.join("d/after"), &block(8, 1, 100_000));
    ok(&pairfs(&["umount", smnt.to_str().unwrap()]), "umount S");
    p.stop("-TERM");
    let plog = p.log();
    assert_eq!(
        plog.matches("it rejoins as the secondary").count(),
        2,
        "{plog}"
    );
    assert!(plog.contains("took the database"), "{plog}");
    assert!(!plog.contains("full sync"), "{plog}");
    // The second resync is of the marks again, not of every block.
    let slog = std::fs::read_to_string(v.dir.path().join("new-primary.log")).unwrap();
    let begins: Vec<&str> = slog
        .lines()
        .filter(|l| l.contains("resync of stream"))
        .collect();
    eprintln!("rejoin cut: {begins:?}");
    assert!(!begins.is_empty(), "{slog}");
    assert!(begins.iter().all(|l| !l.contains("begins: all")), "{slog}");
    let _ = promote_and_compare(&mut v, &s, &mut p);
}

/// Paths under `root` with their content hashes, or the error of the first failing
/// access (the secondary's copy mount refuses with EAGAIN while it is not consistent).
fn try_tree(root: &Path) -> std::io::Result<Vec<String>> {
    std::fs::read_dir(root)?;
    Ok(tree(root))
}

#[test]
fn the_secondary_serves_its_frozen_copies_while_it_replicates() {
    let mut v = Vol::new("1G");
    let key = key_file(v.dir.path(), "key", "0123456789abcdef0123456789abcdef\n");
    let scopy = v.dir.path().join("scopy");
    std::fs::create_dir_all(&scopy).unwrap();
    let mut s = Secondary::start(v.dir.path(), &key);
    s.stop("-TERM");
    s.extra = vec![
        "--copy-mount",
        Box::leak(scopy.to_str().unwrap().to_string().into_boxed_str()),
    ];
    s.restart();
    // Nothing to serve before the first full sync: EAGAIN, not an empty tree.
    let e = try_tree(&scopy).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EAGAIN), "{e}");
    // The root's user.pairfs.replica says why, even then.
    let line = replica_line(&scopy);
    assert!(
        line.starts_with("closed reason=\"no full sync yet\""),
        "{line}"
    );
    ok(&mount_replica(&mut v, &s, &[]), "mount --replica");
    std::fs::create_dir_all(v.path("d/sub")).unwrap();
    for i in 0..200u64 {
        std::fs::write(
            v.path(&format!("d/sub/f{i}")),
            block(i, 1, 1000 + i as usize * 97),
        )
        .unwrap();
    }
    write_fsync(&v.path("d/big"), &block(1000, 1, 16 << 20));
    ok(
        &pairfs(&["split", v.path("d").to_str().unwrap(), "--wait"]),
        "split d",
    );
    // A named generation too: kept by copy-on-write alone, so until the primary
    // overwrites a track the secondary reads it from its volume image, which the
    // stream keeps writing meanwhile.
    ok(
        &pairfs(&["split", "--generation", "g0", v.path("d").to_str().unwrap()]),
        "generation g0",
    );
    wait_in_sync(&v.mnt, "after the split");
    let frozen = tree(&v.copy);
    assert!(frozen.len() > 400, "{}", frozen.len());
    assert!(
        frozen.iter().any(|l| l.starts_with("@g0/d/big ")),
        "{frozen:?}"
    );
    // The secondary serves the same instants, and keeps serving them exactly while the
    // primary overwrites (copy-on-write), removes and creates under the split directory.
    assert_eq!(
        try_tree(&scopy).unwrap(),
        frozen,
        "secondary copy after the split"
    );
    let line = replica_line(&scopy);
    assert!(
        line.starts_with("serving state=")
            && line.contains(" repl_seq=")
            && line.contains(" replica_of="),
        "{line}"
    );
    eprintln!("the secondary's copy mount: user.pairfs.replica = {line}");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (mnt, stop) = (v.mnt.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut round = 2u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(mnt.join("d/big"))
                    .unwrap();
                for k in 0..16u64 {
                    use std::os::unix::fs::FileExt;
                    f.write_all_at(&block(k, round, 65536), ((k * 7 + round) % 256) * 65536)
                        .unwrap();
                }
                f.sync_all().unwrap();
                let i = round % 200;
                write_fsync(&mnt.join(format!("d/sub/f{i}")), &block(i, round, 3000));
                write_fsync(&mnt.join(format!("d/new{round}")), &block(round, 1, 5000));
                let _ = std::fs::remove_file(mnt.join(format!("d/sub/f{}", (i + 100) % 200)));
                round += 1;
            }
            round
        })
    };
    let mut reads = 0;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(6) {
        assert_eq!(
            tree(&scopy),
            frozen,
            "secondary copy while the primary writes"
        );
        reads += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = writer.join().unwrap();
    eprintln!("{reads} reads of the secondary's copy while the primary wrote {rounds} rounds");
    assert!(rounds > 4 && reads > 1, "rounds {rounds}, reads {reads}");
    wait_in_sync(&v.mnt, "after the writer");
    // A tar of the secondary's copy, a real backup client, reads the same bytes.
    let tarball = v.dir.path().join("copy.tar");
    let out = Command::new("tar")
        .args([
            "-cf",
            tarball.to_str().unwrap(),
            "-C",
            scopy.to_str().unwrap(),
            "d",
        ])
        .output()
        .unwrap();
    ok(&out, "tar of the secondary's copy mount");
    // An update, a named generation, then a release show up at the secondary.
    ok(
        &pairfs(&["update", v.path("d").to_str().unwrap(), "--wait"]),
        "update d",
    );
    ok(
        &pairfs(&["split", "--generation", "g1", v.path("d").to_str().unwrap()]),
        "generation g1",
    );
    write_fsync(&v.path("d/after-g1"), &block(7, 7, 7000));
    wait_in_sync(&v.mnt, "after the update");
    let updated = tree(&v.copy);
    assert_ne!(updated, frozen);
    assert!(
        updated.iter().any(|l| l.starts_with("@g1/d/big ")),
        "{updated:?}"
    );
    assert_eq!(tree(&scopy), updated, "secondary copy after the update");
    // A restarted secondary serves its copies at once (it is consistent).
    s.stop("-TERM");
    s.restart();
    assert_eq!(tree(&scopy), updated, "secondary copy after a restart");
    wait_in_sync(&v.mnt, "after the secondary's restart");
    for g in ["g0", "g1"] {
        ok(
            &pairfs(&["release", "--generation", g, v.path("d").to_str().unwrap()]),
            "release a generation",
        );
    }
    ok(
        &pairfs(&["release", v.path("d").to_str().unwrap()]),
        "release d",
    );
    wait_in_sync(&v.mnt, "after the release");
    assert_eq!(tree(&v.copy), Vec::<String>::new());
    assert_eq!(
        tree(&scopy),
        Vec::<String>::new(),
        "secondary copy after the release"
    );
    v.umount();
    // SIGTERM unmounts the copy mount.
    s.stop("-TERM");
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        !mounts.contains(scopy.to_str().unwrap()),
        "copy mount left behind: {mounts}"
    );
    ok(
        &pairfs(&["fsck", s.img.to_str().unwrap()]),
        "fsck secondary",
    );
    v.fsck();
}

#[test]
fn a_promoted_secondary_mounts_while_the_old_primary_is_down_and_it_rejoins_later_by_bitmap() {
    let _heavy = heavy();
    let mut v = Vol::new("512M");
    let key = key_file(v.dir.path(), "key", "0123456789abcdef-failover");
    let mut s = Secondary::start(v.dir.path(), &key);
    ok(&mount_replica(&mut v, &s, &[]), "mount P");
    fail_over(&mut v, &mut s, 32 << 20);
    // The old primary is down: S mounts with --replica to where it will be, and serves.
    let p_addr = format!("127.0.0.1:{}", free_port());
    let smnt = v.dir.path().join("smnt");
    let scopy = v.dir.path().join("scopy");
    std::fs::create_dir_all(&scopy).unwrap();
    let out = mount_new_primary(
        &v,
        &s,
        &smnt,
        &[
            "--copy-mount",
            scopy.to_str().unwrap(),
            "--replica",
            &p_addr,
            "--on-disconnect",
            "continue",
        ],
        &[],
    );
    ok(
        &out,
        "mount S with --replica to the old primary, which is down",
    );
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(said.contains("serving without the secondary"), "{said}");
    assert!(said.contains("out of sync by the bitmap"), "{said}");
    let line = replica_line(&smnt);
    assert!(!line.starts_with("in_sync"), "{line}");
    // S works alone: a new file, overwrites of the big file, a split of another dir.
    write_on_new_primary(&smnt, 8_000);
    // The old primary comes back and rejoins: by bitmap, not a full sync.
    let mut p = serve_rejoin(&v, &key, p_addr);
    wait_in_sync(&smnt, "the old primary rejoined");
    let plog = p.log();
    assert!(!plog.contains("full sync"), "{plog}");
    assert!(plog.contains("took the database"), "{plog}");
    let log = std::fs::read_to_string(v.dir.path().join("new-primary.log")).unwrap();
    let sent = resync_sent(&log);
    let full = full_sync_bytes(&s.img);
    let rejoin_line = log.lines().find(|l| l.contains("rejoins as the secondary"));
    eprintln!(
        "failover then rejoin: the resync sent {sent} bytes of blocks, a full sync about {full} ({rejoin_line:?})"
    );
    assert!(
        rejoin_line.is_some_and(|l| l.contains("resync by bitmap")),
        "{log}"
    );
    assert!(
        sent * 2 < full,
        "resync sent {sent} bytes, a full sync {full}"
    );
    ok(&pairfs(&["umount", smnt.to_str().unwrap()]), "umount S");
    let ca = promote_and_compare(&mut v, &s, &mut p);
    assert!(ca.iter().any(|l| l.starts_with("e/x ")), "{ca:?}");
}

/// Unmounts what a test mounted by hand, when dropped (a failing test included).
struct Unmount(Vec<PathBuf>);

impl Drop for Unmount {
    fn drop(&mut self) {
        for m in &self.0 {
            let _ = Command::new(BIN)
                .args(["umount", m.to_str().unwrap()])
                .stderr(Stdio::null())
                .output();
            let _ = Command::new("umount")
                .arg("-l")
                .arg(m)
                .stderr(Stdio::null())
                .output();
        }
    }
}

/// The new primary crashes (kill -9 of its daemon) during a rejoin, twice: first before
/// the old primary took its database (the old primary is still a primary volume with
/// its bitmap: the next mount rejoins by both bitmaps again), then after it (the old
/// primary is a replica of the stream cut in a resync: the next mount resyncs by the
/// marks the new primary's bitmap file kept). A rate-limited proxy slows the resync so
/// that each kill lands in it; the new primary writes between the kills (in `async`
/// mode, so its writes do not wait for the slow link). No full sync; both sides end
/// byte-identical, frozen copies included, fsck clean.
#[test]
fn a_new_primary_killed_during_a_rejoin_rejoins_by_bitmap() {
    let _heavy = heavy();
    let mut v = Vol::new("256M");
    let key = key_file(v.dir.path(), "key", "0123456789abcdef-rejoin-kill");
    let mut s = Secondary::start(v.dir.path(), &key);
    ok(&mount_replica(&mut v, &s, &[]), "mount P");
    fail_over(&mut v, &mut s, 16 << 20);
    let mut p = serve_rejoin(&v, &key, format!("127.0.0.1:{}", free_port()));
    let chaos = Chaos::start(&p.addr);
    let smnt = v.dir.path().join("smnt");
    let scopy = v.dir.path().join("scopy");
    std::fs::create_dir_all(&smnt).unwrap();
    std::fs::create_dir_all(&scopy).unwrap();
    let _unmount = Unmount(vec![smnt.clone(), scopy.clone()]);
    let slog = v.dir.path().join("new-primary.log");
    let mount_s = |mode: &str| {
        let out = Command::new(BIN)
            .args(["mount", s.img.to_str().unwrap(), smnt.to_str().unwrap()])
            .args(["--copy-mount", scopy.to_str().unwrap(), "--daemon"])
            .args([
                "--replica",
                &chaos.addr,
                "--key-file",
                key.to_str().unwrap(),
            ])
            .args(["--replica-mode", mode])
            .env("PAIRFS_LOG_FILE", &slog)
            .env("RUST_LOG", "info")
            .output()
            .unwrap();
        ok(&out, "mount S with --replica to the old primary");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let rate = |r: u64| chaos.rate.store(r, std::sync::atomic::Ordering::SeqCst);
    let took = |p: &Secondary| p.log().matches("took the database").count();
    // The blocks a mount said it resyncs by bitmap.
    let blocks = |said: &str| -> u64 {
        said.split_once("resync by bitmap, ")
            .or_else(|| said.split_once("out-of-sync bitmap has "))
            .and_then(|(_, r)| r.split_once(' ')?.0.parse().ok())
            .unwrap_or_else(|| panic!("no block count in {said}"))
    };

    // 1. A crawl (2 KB/s): the database is still on its way when S dies.
    rate(2_000);
    let said = mount_s("async");
    eprintln!("rejoin mount: {said}");
    assert!(
        said.contains("rejoins as the secondary") && said.contains("resync by bitmap"),
        "{said}"
    );
    let count1 = blocks(&said);
    write_fsync(&smnt.join("d/s1"), &block(21, 1, 3 << 20));
    kill9_mount(&s.img, &[&smnt, &scopy]);
    chaos.cut();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(took(&p), 0, "{}", p.log());
    assert!(p.alive(), "the old primary's replica serve died");

    // 2. The old primary is still a primary with its bitmap: a rejoin by both bitmaps
    // again. 300 KB/s: it takes the database within a second, the blocks take longer;
    // S dies in the middle of them.
    rate(300_000);
    let said = mount_s("async");
    eprintln!("rejoin mount: {said}");
    assert!(
        said.contains("rejoins as the secondary") && said.contains("resync by bitmap"),
        "second mount: {said}"
    );
    // The marks put back from the cut resync and S's 3 MiB written since (in regions of
    // its activity log, as S died with them unacked).
    let count2 = blocks(&said);
    assert!(count2 > count1, "{count2} <= {count1}: {said}");
    let t = Instant::now();
    while took(&p) == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the old primary did not take the database: {}",
            p.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    write_fsync(&smnt.join("d/s2"), &block(22, 1, 3 << 20));
    write_fsync(&smnt.join("d/f3"), &block(3, 4, 70_000));
    std::thread::sleep(Duration::from_millis(300));
    // The resync's blocks are pushed (queued behind the slow link) at once; its end is
    // not acked yet (checked below in the old primary's log).
    let line = replica_line(&smnt);
    assert!(!line.starts_with("in_sync"), "{line}");
    kill9_mount(&s.img, &[&smnt, &scopy]);
    chaos.cut();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !p.log().contains("resync from"),
        "the resync ended before S was killed: {}",
        p.log()
    );
    assert!(
        cut_in_a_resync(&v.img),
        "the old primary is not in a cut resync"
    );

    // 3. The old primary is a replica of the stream, cut in a resync: S's bitmap file
    // kept the marks of that resync (and its own writes since): a resync by bitmap.
    rate(0);
    let said = mount_s("sync");
    eprintln!("mount after the second kill: {said}");
    assert!(
        said.contains("resync by bitmap") && !said.contains("rejoins as the secondary"),
        "third mount: {said}"
    );
    // At least the marks of the cut resync (S's 3 MiB written since may lie in regions
    // marked already: a sequential writer marks the 7 regions after its own).
    let count3 = blocks(&said);
    assert!(count3 >= count2, "{count3} < {count2}: {said}");
    wait_in_sync(&smnt, "after the new primary's crashes");
    write_fsync(&smnt.join("d/after"), &block(8, 1, 100_000));
    ok(&pairfs(&["umount", smnt.to_str().unwrap()]), "umount S");
    p.stop("-TERM");
    let plog = p.log();
    assert_eq!(
        plog.matches("it rejoins as the secondary").count(),
        2,
        "{plog}"
    );
    assert_eq!(took(&p), 1, "{plog}");
    assert!(!plog.contains("full sync"), "{plog}");
    let log = std::fs::read_to_string(&slog).unwrap();
    let begins: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("resync of stream"))
        .collect();
    eprintln!("new primary killed in a rejoin: {begins:?}");
    assert!(!begins.is_empty(), "{log}");
    assert!(begins.iter().all(|l| !l.contains("begins: all")), "{log}");
    let ca = promote_and_compare(&mut v, &s, &mut p);
    assert!(ca.iter().any(|l| l.starts_with("d/big ")), "{ca:?}");
}

/// A disk that fails on demand, for the secondary: ext4 on a loop device whose backing
/// file is the one file (`disk`) of a small FUSE file system served by this test
/// process over a sparse file. While failing, every read, write and fsync of that file
/// answers `EIO`, so every I/O of the loop device ends in `EIO` as on a dead disk or
/// a device-mapper `error` target. (This machine's kernel has no device mapper, nbd or
/// fault injection; loop and FUSE are what every kernel here has.) Unmounted, detached
/// and removed when dropped, a failing test included.
struct FailingDisk {
    dir: PathBuf,
    /// Where ext4 is mounted: the secondary's images go here.
    mnt: PathBuf,
    fuse_mnt: PathBuf,
    backing: PathBuf,
    loop_dev: String,
    fail: std::sync::Arc<std::sync::atomic::AtomicBool>,
    session: Option<fuser::BackgroundSession>,
}

/// The FUSE side of [`FailingDisk`]: inode 1 the root, inode 2 the file `disk`.
struct DiskFs {
    file: std::fs::File,
    size: u64,
    fail: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl DiskFs {
    fn attr(&self, ino: u64) -> fuser::FileAttr {
        let t = std::time::SystemTime::UNIX_EPOCH;
        let dir = ino == 1;
        fuser::FileAttr {
            ino: fuser::INodeNo(ino),
            size: if dir { 0 } else { self.size },
            blocks: if dir { 0 } else { self.size / 512 },
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind: if dir {
                fuser::FileType::Directory
            } else {
                fuser::FileType::RegularFile
            },
            perm: if dir { 0o755 } else { 0o600 },
            nlink: if dir { 2 } else { 1 },
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn failing(&self) -> bool {
        self.fail.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl fuser::Filesystem for DiskFs {
    fn lookup(
        &self,
        _req: &fuser::Request,
        parent: fuser::INodeNo,
        name: &std::ffi::OsStr,
        reply: fuser::ReplyEntry,
    ) {
        if parent.0 == 1 && name == "disk" {
            reply.entry(&Duration::from_secs(1), &self.attr(2), fuser::Generation(0));
        } else {
            reply.error(fuser::Errno::ENOENT);
        }
    }

    fn getattr(
        &self,
        _req: &fuser::Request,
        ino: fuser::INodeNo,
        _fh: Option<fuser::FileHandle>,
        reply: fuser::ReplyAttr,
    ) {
        match ino.0 {
            1 | 2 => reply.attr(&Duration::from_secs(1), &self.attr(ino.0)),
            _ => reply.error(fuser::Errno::ENOENT),
        }
    }

    fn open(
        &self,
        _req: &fuser::Request,
        _ino: fuser::INodeNo,
        _flags: fuser::OpenFlags,
        reply: fuser::ReplyOpen,
    ) {
        // No page cache in between: every I/O of the loop device comes here.
        reply.opened(fuser::FileHandle(0), fuser::FopenFlags::FOPEN_DIRECT_IO);
    }

    fn read(
        &self,
        _req: &fuser::Request,
        _ino: fuser::INodeNo,
        _fh: fuser::FileHandle,
        offset: u64,
        size: u32,
        _flags: fuser::OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: fuser::ReplyData,
    ) {
        use std::os::unix::fs::FileExt;
        if self.failing() {
            return reply.error(fuser::Errno::EIO);
        }
        let n = (size as u64).min(self.size.saturating_sub(offset)) as usize;
        let mut b = vec![0u8; n];
        match self.file.read_exact_at(&mut b, offset) {
            Ok(()) => reply.data(&b),
            Err(_) => reply.error(fuser::Errno::EIO),
        }
    }

    fn write(
        &self,
        _req: &fuser::Request,
        _ino: fuser::INodeNo,
        _fh: fuser::FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: fuser::WriteFlags,
        _flags: fuser::OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: fuser::ReplyWrite,
    ) {
        use std::os::unix::fs::FileExt;
        if self.failing() || offset + data.len() as u64 > self.size {
            return reply.error(fuser::Errno::EIO);
        }
        match self.file.write_all_at(data, offset) {
            Ok(()) => reply.written(data.len() as u32),
            Err(_) => reply.error(fuser::Errno::EIO),
        }
    }

    fn flush(
        &self,
        _req: &fuser::Request,
        _ino: fuser::INodeNo,
        _fh: fuser::FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: fuser::ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &fuser::Request,
        _ino: fuser::INodeNo,
        _fh: fuser::FileHandle,
        _datasync: bool,
        reply: fuser::ReplyEmpty,
    ) {
        if self.failing() {
            return reply.error(fuser::Errno::EIO);
        }
        match self.file.sync_data() {
            Ok(()) => reply.ok(),
            Err(_) => reply.error(fuser::Errno::EIO),
        }
    }
}

fn run_ok(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    ok(&out, what);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl FailingDisk {
    /// A 512 MiB disk (sparse, on the test directory's file system), ext4, mounted.
    fn new(name: &str) -> FailingDisk {
        let dir = PathBuf::from(format!("/tmp/eio-{name}-{}", std::process::id()));
        let (mnt, fuse_mnt) = (dir.join("ext4"), dir.join("fuse"));
        std::fs::create_dir_all(&mnt).unwrap();
        std::fs::create_dir_all(&fuse_mnt).unwrap();
        let base = std::env::var("PAIRFS_TEST_DIR").unwrap_or_else(|_| "/var/tmp".into());
        let backing = PathBuf::from(format!("{base}/eio-{name}-{}.disk", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&backing)
            .unwrap();
        let size = 512 << 20;
        file.set_len(size).unwrap();
        let fail = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut config = fuser::Config::default();
        config.mount_options = vec![fuser::MountOption::FSName("pairfs-test-disk".into())];
        let session = fuser::spawn_mount(
            DiskFs {
                file,
                size,
                fail: fail.clone(),
            },
            &fuse_mnt,
            &config,
        )
        .unwrap();
        let mut d = FailingDisk {
            dir,
            mnt,
            fuse_mnt,
            backing,
            loop_dev: String::new(),
            fail,
            session: Some(session),
        };
        d.loop_dev = run_ok(
            Command::new("losetup")
                .args(["--find", "--show"])
                .arg(d.fuse_mnt.join("disk")),
            "losetup",
        );
        run_ok(
            Command::new("mkfs.ext4").args(["-q", "-F", "-E", "nodiscard", &d.loop_dev]),
            "mkfs.ext4",
        );
        d.mount();
        d
    }

    fn mount(&self) {
        run_ok(
            Command::new("mount")
                .args(["-t", "ext4", &self.loop_dev])
                .arg(&self.mnt),
            "mount the ext4 of the failing disk",
        );
    }

    /// Every I/O of the disk fails with EIO (`true`) or works again (`false`).
    fn fail(&self, on: bool) {
        self.fail.store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// What an administrator does once the disk works again and ext4 gave up on its
    /// journal: unmount, `e2fsck -fy`, mount. Returns e2fsck's report.
    fn repair(&self) -> String {
        run_ok(Command::new("umount").arg(&self.mnt), "umount the ext4");
        let out = Command::new("e2fsck")
            .args(["-fy", &self.loop_dev])
            .output()
            .unwrap();
        // 0: clean, 1: errors corrected.
        assert!(
            matches!(out.status.code(), Some(0 | 1)),
            "e2fsck: {:?}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        self.mount();
        format!(
            "e2fsck exit {:?}: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout)
        )
    }
}

/// An EIO in a log or status: the OS's message, or SQLite's (`SQLITE_IOERR`).
fn eio(text: &str) -> bool {
    text.contains("Input/output error") || text.contains("disk I/O error")
}

impl Drop for FailingDisk {
    fn drop(&mut self) {
        self.fail(false);
        let _ = Command::new("umount").arg(&self.mnt).output();
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).output();
        if !self.loop_dev.is_empty() {
            let _ = Command::new("losetup")
                .args(["-d", &self.loop_dev])
                .output();
        }
        if let Some(s) = self.session.take()
            && s.umount_and_join().is_err()
        {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.fuse_mnt)
                .output();
        }
        let _ = std::fs::remove_file(&self.backing);
        let _ = std::fs::remove_dir(&self.mnt);
        let _ = std::fs::remove_dir(&self.fuse_mnt);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[test]
fn a_failing_secondary_disk_eio_with_continue_leaves_the_primary_serving_then_catches_up() {
    let disk = FailingDisk::new("continue");
    let mut v = Vol::new("256M");
    let key = key_file(v.dir.path(), "key", "0123456789abcdef-eio");
    let mut s = Secondary::start_in(&disk.mnt, v.dir.path(), &key);
    ok(
        &mount_replica_env(
            &mut v,
            &s,
            &["--on-disconnect", "continue"],
            &[("PAIRFS_REPL_BUFFER", "4M")],
        ),
        "mount (sync, continue)",
    );
    split_dir_with_a_file(&v, 2 << 20);
    wait_in_sync(&v.mnt, "before the disk fails");
    // The secondary's disk dies: 20 MiB of fsync'd files and a copy-on-write overwrite
    // on the primary; every write and fsync returns.
    disk.fail(true);
    let t = Instant::now();
    for i in 0..10u64 {
        write_fsync(&v.path(&format!("d/f{i}")), &block(10 + i, 1, 2 << 20));
    }
    write_fsync(&v.path("d/a"), &block(1, 2, 1 << 20));
    let took = t.elapsed();
    eprintln!("20 MiB of fsync'd writes with the secondary's disk failing: {took:?}");
    assert!(took < Duration::from_secs(30), "{took:?}");
    // Past its 4 MiB buffer the primary is out of sync, and `pairfs status` says why:
    // the secondary's refusal (EIO on its first failed record; once ext4 gave up on its
    // journal, a read-only file system at each reconnection).
    let t = Instant::now();
    let status = loop {
        let out = pairfs(&["status", "--json", v.mnt.to_str().unwrap()]);
        ok(&out, "pairfs status --json");
        let status = String::from_utf8_lossy(&out.stdout).into_owned();
        if status.contains("\"out_of_sync\"")
            && (eio(&status) || status.contains("Read-only file system"))
        {
            break status;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "{status}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let error = status
        .lines()
        .find(|l| l.contains("\"error\""))
        .unwrap_or_default()
        .trim()
        .to_string();
    eprintln!("disk failing: {error}");
    let plog = std::fs::read_to_string(v.dir.path().join("primary.log")).unwrap();
    assert!(
        plog.contains("the secondary stopped: applying record") && eio(&plog),
        "{plog}"
    );
    let slog = s.log();
    assert!(eio(&slog), "the secondary did not hit EIO: {slog}");
    assert!(s.alive(), "the secondary died on a failing disk");
    for i in 0..10u64 {
        assert_eq!(
            std::fs::read(v.path(&format!("d/f{i}"))).unwrap(),
            block(10 + i, 1, 2 << 20)
        );
    }
    assert_eq!(std::fs::read(v.path("d/a")).unwrap(), block(1, 2, 1 << 20));
    // The disk works again. ext4 aborted its journal on the failed writes (the file
    // system is read-only until it is unmounted and checked), so the repair stops the
    // secondary's service, checks and remounts the file system and starts the service
    // again; the primary's link catches up by itself.
    disk.fail(false);
    s.stop("-TERM");
    eprintln!("repair: {}", disk.repair());
    s.restart();
    wait_in_sync(&v.mnt, "after the disk was repaired");
    write_fsync(&v.path("d/after"), &block(5, 1, 50_000));
    stop_promote_and_compare(&mut v, &mut s);
}

/// Kills -9 the daemon mounted on the image if the test fails: a `block` primary whose
/// secondary is gone would keep its stalled writer (and so the test process) forever.
struct KillOnPanic(PathBuf);

impl Drop for KillOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let pat = format!(" mount {} ", self.0.display());
            if let Ok(out) = Command::new("pgrep").arg("-f").arg(&pat).output() {
                for p in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", p]).output();
                }
            }
        }
    }
}

#[test]
fn a_failing_secondary_disk_eio_with_block_stalls_fsync_until_it_is_repaired() {
    let disk = FailingDisk::new("block");
    let mut v = Vol::new("256M");
    let key = key_file(v.dir.path(), "key", "0123456789abcdef-eio-block");
    let mut s = Secondary::start_in(&disk.mnt, v.dir.path(), &key);
    ok(&mount_replica(&mut v, &s, &[]), "mount (sync, block)");
    let _kill = KillOnPanic(v.img.clone());
    split_dir_with_a_file(&v, 100_000);
    wait_in_sync(&v.mnt, "before the disk fails");
    // fsync'd 1 MiB files; `done` is the last whose fsync returned.
    let (done, w) = fsync_writer(&v.mnt, 12u64, 1 << 20);
    let t = Instant::now();
    while done.load(std::sync::atomic::Ordering::SeqCst) < 3 {
        assert!(t.elapsed() < Duration::from_secs(30), "the writer is slow");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The disk dies under the writer: its fsync stalls (nothing is acknowledged that
    // the secondary did not make durable) and the status says why.
    disk.fail(true);
    wait_stalled(&done, 12, &v.mnt, 30, |l| {
        eio(l) || l.contains("Read-only file system")
    });
    assert!(eio(&s.log()), "the secondary did not hit EIO: {}", s.log());
    assert!(s.alive(), "the secondary died on a failing disk");
    // Repaired (see the `continue` test): the writer resumes and finishes.
    disk.fail(false);
    s.stop("-TERM");
    eprintln!("repair: {}", disk.repair());
    s.restart();
    wait_writer(&done, 12, &v.mnt);
    w.join().unwrap();
    wait_in_sync(&v.mnt, "after the disk was repaired");
    for i in 1..=12u64 {
        assert_eq!(
            std::fs::read(v.path(&format!("d/f{i}"))).unwrap(),
            block(i, 1, 1 << 20)
        );
    }
    stop_promote_and_compare(&mut v, &mut s);
}
