//! Volumes on NBD exports served by real servers that the tests start themselves:
//! nbdkit (file and memory plugins) and qemu-nbd, over a Unix socket and over TCP on
//! loopback. The client calls on every server; mkfs, mount, a pair split under a running
//! writer, the frozen copy read through the copy mount, update, remount and fsck with
//! the volume and the copy image on NBD; a server killed under load (writes fail `EIO`,
//! the pair goes to `error`, the daemon exits cleanly); fsx on an NBD-backed mount.
//!
//! Needs `nbdkit` and `qemu-nbd` (Debian: nbdkit, qemu-utils; .ci/run installs them).

mod common;

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{BIN, block, pairfs, setx, state, wait_state};
use pairfs::store::nbd::{NbdVolume, Policy};
use pairfs::store::volume::Volume;

const MIB: u64 = 1 << 20;

fn tmpdir() -> tempfile::TempDir {
    let base = std::env::var("PAIRFS_TEST_DIR").unwrap_or_else(|_| "/var/tmp".into());
    tempfile::Builder::new()
        .prefix("pairfs-nbd")
        .tempdir_in(base)
        .unwrap()
}

fn need(tool: &str) {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "{tool} is not installed (Debian: apt-get install nbdkit qemu-utils)"
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    NbdkitFile,
    NbdkitMemory,
    QemuNbd,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Net {
    Unix,
    Tcp,
}

/// A server process, killed when dropped.
struct Server {
    child: Child,
    uri: String,
}

impl Server {
    /// Serves `file` (created with `size` bytes if missing) or `size` bytes of memory.
    fn start(kind: Kind, net: Net, dir: &Path, name: &str, size: u64) -> Server {
        Self::start_after(Duration::ZERO, kind, net, dir, name, size)
    }

    /// [`Server::start`], the server process starting after `delay` (the call returns
    /// at once when there is a delay).
    fn start_after(
        delay: Duration,
        kind: Kind,
        net: Net,
        dir: &Path,
        name: &str,
        size: u64,
    ) -> Server {
        let file = dir.join(format!("{name}.img"));
        if kind != Kind::NbdkitMemory && !file.exists() {
            OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&file)
                .unwrap()
                .set_len(size)
                .unwrap();
        }
        let sock = dir.join(format!("{name}.sock"));
        let _ = std::fs::remove_file(&sock);
        let port = free_port();
        let mut cmd = match kind {
            Kind::NbdkitFile | Kind::NbdkitMemory => {
                need("nbdkit");
                let mut c = Command::new("nbdkit");
                c.arg("-f");
                match net {
                    Net::Unix => c.arg("-U").arg(&sock),
                    Net::Tcp => c.args(["-i", "127.0.0.1", "-p", &port.to_string()]),
                };
                if kind == Kind::NbdkitFile {
                    c.arg("file").arg(&file);
                } else {
                    c.arg("memory").arg(size.to_string());
                }
                c
            }
            Kind::QemuNbd => {
                need("qemu-nbd");
                let mut c = Command::new("qemu-nbd");
                c.args(["-t", "-f", "raw", "-x", "exp"]);
                match net {
                    Net::Unix => c.arg("-k").arg(&sock),
                    Net::Tcp => c.args(["-b", "127.0.0.1", "-p", &port.to_string()]),
                };
                c.arg(&file);
                c
            }
        };
        if !delay.is_zero() {
            let mut sh = Command::new("sh");
            sh.args(["-c", "sleep \"$0\"; exec \"$@\""])
                .arg(format!("{}", delay.as_secs_f64()))
                .arg(cmd.get_program())
                .args(cmd.get_args());
            cmd = sh;
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let export = if kind == Kind::QemuNbd { "exp" } else { "" };
        let uri = match net {
            Net::Unix => format!("nbd+unix:///{export}?socket={}", sock.display()),
            Net::Tcp => format!("nbd://127.0.0.1:{port}/{export}"),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while delay.is_zero() {
            let up = match net {
                Net::Unix => std::os::unix::net::UnixStream::connect(&sock).is_ok(),
                Net::Tcp => std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
            };
            if up {
                break;
            }
            assert!(Instant::now() < deadline, "{kind:?} did not start: {uri}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Server { child, uri }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn quick() -> Policy {
    Policy {
        reconnect: Duration::from_millis(500),
        io_timeout: Duration::from_secs(10),
    }
}

fn exercise(v: &NbdVolume) {
    let len = v.len();
    // Unaligned bytes, across the end of a 4 KiB block.
    v.write_at(4090, b"hello, nbd").unwrap();
    let mut b = [0u8; 10];
    v.read_at(4090, &mut b).unwrap();
    assert_eq!(&b, b"hello, nbd");
    // More than one request's payload (32 MiB).
    let big: Vec<u8> = (0..33 * MIB as usize + 7)
        .map(|i| (i % 251) as u8)
        .collect();
    v.write_at(MIB + 3, &big).unwrap();
    let mut back = vec![0u8; big.len()];
    v.read_at(MIB + 3, &mut back).unwrap();
    assert!(back == big, "33 MiB round trip differs");
    // Discard reads as zero.
    v.discard(MIB, 2 * MIB).unwrap();
    let mut z = vec![1u8; 2 * MIB as usize + 10];
    v.read_at(MIB, &mut z).unwrap();
    assert!(z[..2 * MIB as usize].iter().all(|&x| x == 0));
    assert_eq!(&z[2 * MIB as usize..], &big[2 * MIB as usize - 3..][..10]);
    v.sync().unwrap();
    // Out of range is an error, not a request.
    assert!(v.read_at(len - 1, &mut [0u8; 2]).is_err());
    assert!(v.write_at(len, b"x").is_err());
}

/// The client on each server and transport: reads, writes, large and unaligned
/// requests, discard, flush, concurrent callers, read-only and unknown exports.
#[test]
fn client_calls_on_nbdkit_and_qemu_nbd_over_unix_and_tcp() {
    let dir = tmpdir();
    for (i, (kind, net)) in [
        (Kind::NbdkitFile, Net::Unix),
        (Kind::NbdkitMemory, Net::Tcp),
        (Kind::QemuNbd, Net::Unix),
        (Kind::QemuNbd, Net::Tcp),
    ]
    .into_iter()
    .enumerate()
    {
        let s = Server::start(kind, net, dir.path(), &format!("s{i}"), 64 * MIB);
        let v = Arc::new(NbdVolume::open_with(&s.uri, true, "volume", quick()).unwrap());
        assert_eq!(v.len(), 64 * MIB, "{kind:?} {net:?}");
        exercise(&v);
        // Four threads at once, each on its own region.
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let v = v.clone();
                std::thread::spawn(move || {
                    for k in 0..50u64 {
                        let data = block(t * 1000 + k, 1, 8192 + t as usize);
                        let off = 40 * MIB + t * MIB + k * 9000;
                        v.write_at(off, &data).unwrap();
                        let mut back = vec![0u8; data.len()];
                        v.read_at(off, &mut back).unwrap();
                        assert_eq!(back, data);
                    }
                    v.sync().unwrap();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        println!(
            "{kind:?} over {net:?}: {} connection(s), write_zeroes {}",
            v.connections(),
            v.can_write_zeroes()
        );
    }
    // A read-only export cannot be opened for writing; an unknown export is named.
    need("nbdkit");
    let sock = dir.path().join("ro.sock");
    let mut ro = Server {
        child: Command::new("nbdkit")
            .args(["-f", "-r", "-U"])
            .arg(&sock)
            .args(["memory", "1M"])
            .spawn()
            .unwrap(),
        uri: format!("nbd+unix:///?socket={}", sock.display()),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    let e = NbdVolume::open_with(&ro.uri, true, "volume", quick()).unwrap_err();
    assert!(e.to_string().contains("read-only"), "{e}");
    NbdVolume::open_with(&ro.uri, false, "volume", quick()).unwrap();
    ro.kill();
    let q = Server::start(Kind::QemuNbd, Net::Unix, dir.path(), "named", 4 * MIB);
    let wrong = q.uri.replace("/exp?", "/nope?");
    let e = NbdVolume::open_with(&wrong, false, "volume", quick()).unwrap_err();
    assert!(e.to_string().contains("nope"), "{e}");
}

/// The reconnect policy: a server restarted within the budget is reconnected to
/// transparently; a write acknowledged but not flushed before the connection was lost
/// makes the next sync fail; a server gone for longer than the budget gives EIO quickly.
#[test]
fn reconnects_within_the_budget_and_refuses_to_flush_lost_writes() {
    let dir = tmpdir();
    let policy = Policy {
        reconnect: Duration::from_secs(5),
        io_timeout: Duration::from_secs(10),
    };
    let mut s = Server::start(Kind::NbdkitFile, Net::Unix, dir.path(), "r", 16 * MIB);
    let v = NbdVolume::open_with(&s.uri, true, "volume", policy).unwrap();
    v.write_at(0, b"durable").unwrap();
    v.sync().unwrap();
    // Restart the server: the next read reconnects and sees the flushed data.
    s.kill();
    // (nbdkit -f dies with the thread that started it: start it from this one, late.)
    let s = Server::start_after(
        Duration::from_millis(300),
        Kind::NbdkitFile,
        Net::Unix,
        dir.path(),
        "r",
        16 * MIB,
    );
    let mut b = [0u8; 7];
    let t = Instant::now();
    v.read_at(0, &mut b).unwrap();
    assert_eq!(&b, b"durable");
    println!("reconnected after {:?}", t.elapsed());
    let mut s = s;
    // A write not flushed when the connection drops: the next sync fails, for good.
    v.write_at(4096, b"maybe lost").unwrap();
    s.kill();
    let _s = Server::start(Kind::NbdkitFile, Net::Unix, dir.path(), "r", 16 * MIB);
    v.read_at(0, &mut b).unwrap();
    let e = v.sync().unwrap_err();
    assert_eq!(e.errno(), libc::EIO);
    assert!(e.to_string().contains("never flushed"), "{e}");
    assert!(v.sync().is_err());
    // A server that stays away: EIO after the budget, then at once.
    drop(_s);
    let t = Instant::now();
    let e = v.read_at(0, &mut b).unwrap_err();
    assert_eq!(e.errno(), libc::EIO);
    let first = t.elapsed();
    assert!(first >= Duration::from_secs(4), "gave up after {first:?}");
    let t = Instant::now();
    assert!(v.read_at(0, &mut b).is_err());
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "second failure waited"
    );
    println!("gave up after {first:?}: {e}");
}

/// A volume whose images are on NBD exports, mounted with a copy mount.
struct NbdVol {
    _dir: tempfile::TempDir,
    vol: String,
    copy: String,
    meta: PathBuf,
    mnt: PathBuf,
    cmnt: PathBuf,
    daemon: Option<Child>,
}

impl NbdVol {
    fn new(dir: tempfile::TempDir, vol: &str, copy: &str, size: Option<&str>) -> NbdVol {
        let meta = dir.path().join("vol.meta");
        let mnt = dir.path().join("mnt");
        let cmnt = dir.path().join("copy");
        std::fs::create_dir(&mnt).unwrap();
        std::fs::create_dir(&cmnt).unwrap();
        let m = meta.to_str().unwrap();
        // Without --meta and --copy there is nothing to put beside a URI.
        let out = pairfs(&["mkfs", vol, "--size", "64M"]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--meta FILE and --copy"), "{err}");
        let mut args = vec!["mkfs", vol, "--meta", m, "--copy", copy];
        if let Some(s) = size {
            args.extend(["--size", s]);
        }
        let out = pairfs(&args);
        assert!(
            out.status.success(),
            "mkfs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        NbdVol {
            _dir: dir,
            vol: vol.into(),
            copy: copy.into(),
            meta,
            mnt,
            cmnt,
            daemon: None,
        }
    }

    fn args<'a>(&'a self, cmd: &'a str) -> Vec<&'a str> {
        vec![
            cmd,
            &self.vol,
            "--meta",
            self.meta.to_str().unwrap(),
            "--copy",
            &self.copy,
        ]
    }

    /// Mounts in the foreground as a child (stderr captured), waits until it serves.
    fn mount(&mut self, reconnect_secs: &str) {
        let mut a = self.args("mount");
        a.extend([
            self.mnt.to_str().unwrap(),
            "--copy-mount",
            self.cmnt.to_str().unwrap(),
        ]);
        let child = Command::new(BIN)
            .args(&a)
            .env("PAIRFS_NBD_RECONNECT", reconnect_secs)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        self.daemon = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        let want = format!(" {} fuse", self.cmnt.display());
        loop {
            let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
            if mounts.contains(&want) {
                break;
            }
            if let Some(st) = self.daemon.as_mut().unwrap().try_wait().unwrap() {
                let out = self.daemon.take().unwrap().wait_with_output().unwrap();
                panic!(
                    "mount exited {st}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            assert!(Instant::now() < deadline, "mount did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `pairfs umount`, then the daemon's exit status and its log.
    fn umount(&mut self) -> (std::process::ExitStatus, String) {
        let out = pairfs(&["umount", self.mnt.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "umount: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = self.daemon.take().unwrap().wait_with_output().unwrap();
        (
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn fsck(&self) {
        let out = pairfs(&self.args("fsck"));
        assert!(
            out.status.success(),
            "fsck: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for NbdVol {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = Command::new(BIN).arg("umount").arg(&self.mnt).output();
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).output();
            let _ = Command::new("umount").arg("-l").arg(&self.cmnt).output();
            let _ = d.kill();
            let _ = d.wait();
        }
    }
}

/// Rewrites whole passes of `nblocks` blocks of `bs` bytes in order, each pass with the
/// next version, until stopped; returns the number of the last pass begun.
fn pass_writer(
    path: PathBuf,
    nblocks: u64,
    bs: u64,
    stop: Arc<AtomicBool>,
    pass: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        let mut p = 0;
        while !stop.load(Ordering::Relaxed) {
            p += 1;
            pass.store(p, Ordering::SeqCst);
            for b in 0..nblocks {
                f.write_all_at(&block(b, p, bs as usize), b * bs).unwrap();
            }
        }
    })
}

/// The pair test with both images on NBD: split under a running writer gives a copy of
/// one instant (blocks of pass p+1 then of pass p, written in order, so the copy is a
/// prefix of the newer pass), the copy mount serves it, update catches up, and the
/// volume survives remount and fsck.
fn pair_test(v: &mut NbdVol) {
    v.mount("10");
    let bs: u64 = 96 * 1024;
    let nblocks = 256; // 24 MiB
    let path = v.mnt.join("f");
    {
        let mut f = std::fs::File::create(&path).unwrap();
        for b in 0..nblocks {
            f.write_all(&block(b, 0, bs as usize)).unwrap();
        }
        f.sync_all().unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let pass = Arc::new(AtomicU64::new(0));
    let w = pass_writer(path.clone(), nblocks, bs, stop.clone(), pass.clone());
    std::thread::sleep(Duration::from_millis(300));
    setx(&path, "user.pairfs.split").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    w.join().unwrap();
    wait_state(&path, "split");
    // The frozen copy: blocks 0..k of some version q+1, blocks k.. of version q.
    let frozen = std::fs::read(v.cmnt.join("f")).unwrap();
    assert_eq!(frozen.len() as u64, nblocks * bs);
    let version_of = |b: u64| -> u64 {
        let got = &frozen[(b * bs) as usize..((b + 1) * bs) as usize];
        (0..=pass.load(Ordering::SeqCst))
            .find(|&q| got == block(b, q, bs as usize).as_slice())
            .unwrap_or_else(|| panic!("frozen block {b} is of no version"))
    };
    let first = version_of(0);
    let mut k = 0;
    while k < nblocks && version_of(k) == first {
        k += 1;
    }
    for b in k..nblocks {
        assert_eq!(version_of(b) + 1, first, "block {b}: not one instant");
    }
    println!("frozen copy: blocks 0..{k} of pass {first}, the rest one pass older");
    // The live file is the last pass, complete.
    let live = std::fs::read(&path).unwrap();
    assert_ne!(live, frozen);
    // Update catches the copy up.
    setx(&path, "user.pairfs.update").unwrap();
    wait_state(&path, "split");
    assert!(std::fs::read(v.cmnt.join("f")).unwrap() == live);
    let (st, log) = v.umount();
    assert!(st.success(), "daemon: {st}\n{log}");
    v.fsck();
    // Remount: the data and the frozen copy are still there.
    v.mount("10");
    assert!(std::fs::read(&path).unwrap() == live);
    assert!(std::fs::read(v.cmnt.join("f")).unwrap() == live);
    assert_eq!(state(&path).split(' ').next(), Some("split"));
    let (st, log) = v.umount();
    assert!(st.success(), "daemon: {st}\n{log}");
    v.fsck();
}

/// Volume on nbdkit (file plugin), copy image on qemu-nbd, both over Unix sockets;
/// mkfs takes the size from the export.
#[test]
fn pair_test_with_both_images_on_nbd_over_unix_sockets() {
    let dir = tmpdir();
    let vs = Server::start(Kind::NbdkitFile, Net::Unix, dir.path(), "vol", 256 * MIB);
    let cs = Server::start(Kind::QemuNbd, Net::Unix, dir.path(), "copy", 256 * MIB);
    let mut v = NbdVol::new(dir, &vs.uri, &cs.uri, None);
    pair_test(&mut v);
    // A second mount of the same volume (same metadata) is refused while mounted.
    v.mount("10");
    let other = v.mnt.parent().unwrap().join("mnt2");
    std::fs::create_dir(&other).unwrap();
    let mut a = v.args("mount");
    a.push(other.to_str().unwrap());
    let out = pairfs(&a);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("locked"), "{err}");
    let (st, _) = v.umount();
    assert!(st.success());
}

/// Volume on qemu-nbd, copy image on nbdkit, both over TCP on loopback; --size smaller
/// than the exports.
#[test]
fn pair_test_with_both_images_on_nbd_over_tcp() {
    let dir = tmpdir();
    let vs = Server::start(Kind::QemuNbd, Net::Tcp, dir.path(), "vol", 256 * MIB);
    let cs = Server::start(Kind::NbdkitFile, Net::Tcp, dir.path(), "copy", 300 * MIB);
    let mut v = NbdVol::new(dir, &vs.uri, &cs.uri, Some("200M"));
    pair_test(&mut v);
}

/// Servers killed under load: the copy image's server first (the pair goes to `error`,
/// the original keeps working), then the volume's (writes and fsync fail `EIO`); the
/// daemon does not panic and exits when unmounted.
#[test]
fn killed_servers_give_pair_error_and_eio_not_a_panic() {
    let dir = tmpdir();
    let mut vs = Server::start(Kind::NbdkitFile, Net::Unix, dir.path(), "vol", 256 * MIB);
    let mut cs = Server::start(Kind::NbdkitFile, Net::Unix, dir.path(), "copy", 256 * MIB);
    let mut v = NbdVol::new(dir, &vs.uri, &cs.uri, None);
    v.mount("1");
    let path = v.mnt.join("f");
    let bs = 64 * 1024u64;
    let nblocks = 128;
    {
        let mut f = std::fs::File::create(&path).unwrap();
        for b in 0..nblocks {
            f.write_all(&block(b, 0, bs as usize)).unwrap();
        }
        f.sync_all().unwrap();
    }
    setx(&path, "user.pairfs.split").unwrap();
    wait_state(&path, "split");
    // Kill the copy image's server while a writer runs, then update: copying the
    // changed tracks to the copy image fails, the pair goes to error, the writes to the
    // original succeed.
    let stop = Arc::new(AtomicBool::new(false));
    let pass = Arc::new(AtomicU64::new(0));
    let w = pass_writer(path.clone(), nblocks, bs, stop.clone(), pass.clone());
    std::thread::sleep(Duration::from_millis(100));
    cs.kill();
    let _ = setx(&path, "user.pairfs.update");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !state(&path).starts_with("error") {
        assert!(
            Instant::now() < deadline,
            "no error state: {}",
            state(&path)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    w.join()
        .expect("the original keeps working while the copy image is gone");
    println!("pair after the copy server died: {}", state(&path));
    // Kill the volume's server under a writer that fsyncs: EIO, within the reconnect
    // budget plus slack.
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        vs.kill();
        vs
    });
    let t0 = Instant::now();
    let mut k = 0u64;
    let err = loop {
        k += 1;
        let r = f
            .write_all_at(&block(k % nblocks, 99, bs as usize), (k % nblocks) * bs)
            .and_then(|_| f.sync_data());
        if let Err(e) = r {
            break e;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "writes never failed"
        );
    };
    let _vs = killer.join().unwrap();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    println!("volume server killed: {err} after {:?}", t0.elapsed());
    // Later writes fail too (the volume is poisoned), reads of metadata still work.
    let r = f.write_all_at(b"again", 0).and_then(|_| f.sync_data());
    assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EIO));
    std::fs::metadata(&path).unwrap();
    drop(f);
    let (st, log) = v.umount();
    assert!(!log.contains("panicked"), "daemon panicked:\n{log}");
    assert!(
        st.code().is_some(),
        "the daemon must exit, not die of a signal: {st}\n{log}"
    );
    println!("daemon exit: {st}");
}

/// fsx on a mount whose volume and copy image are nbdkit exports.
#[test]
fn fsx_on_an_nbd_volume() {
    let fsx = std::env::var("FSX").ok().or_else(|| {
        let o = Command::new("sh")
            .args(["-c", "command -v fsx || ls $HOME/.cargo/bin/fsx"])
            .output()
            .ok()?;
        o.status
            .success()
            .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
    });
    let fsx = fsx.expect("fsx is not installed (cargo install --locked fsx@0.3.2)");
    let dir = tmpdir();
    let vs = Server::start(Kind::NbdkitFile, Net::Unix, dir.path(), "vol", 512 * MIB);
    let cs = Server::start(Kind::NbdkitFile, Net::Unix, dir.path(), "copy", 512 * MIB);
    let mut v = NbdVol::new(dir, &vs.uri, &cs.uri, None);
    v.mount("10");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/run-fsx.sh");
    let out = Command::new("bash")
        .arg(script)
        .arg(&v.mnt)
        .env("FSX", &fsx)
        .env("FSX_SEEDS", "1 2 3")
        .env("FSX_OPS", "3000")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fsx:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{}", text.lines().last().unwrap_or(""));
    let (st, log) = v.umount();
    assert!(st.success(), "daemon: {st}\n{log}");
    v.fsck();
}

/// kill -9 of the daemon under an fsyncing writer, with both images on NBD: after a
/// forced unmount, fsck is clean, every block holds its last fsync'd content or a later
/// one, and the frozen copy is still the split instant's, before and after the remount.
#[test]
fn kill_9_of_the_daemon_loses_nothing_synced_on_nbd() {
    let dir = tmpdir();
    let vs = Server::start(Kind::NbdkitFile, Net::Unix, dir.path(), "vol", 256 * MIB);
    let cs = Server::start(Kind::QemuNbd, Net::Tcp, dir.path(), "copy", 256 * MIB);
    let mut v = NbdVol::new(dir, &vs.uri, &cs.uri, None);
    v.mount("10");
    let path = v.mnt.join("f");
    let bs = 32 * 1024u64;
    let nblocks = 256u64;
    {
        let mut f = std::fs::File::create(&path).unwrap();
        for b in 0..nblocks {
            f.write_all(&block(b, 0, bs as usize)).unwrap();
        }
        f.sync_all().unwrap();
    }
    setx(&path, "user.pairfs.split").unwrap();
    wait_state(&path, "split");
    // Writer: pass p rewrites every block with version p, then fsyncs; `synced` is the
    // last pass whose fsync returned.
    let synced = Arc::new(AtomicU64::new(0));
    let w = {
        let (path, synced) = (path.clone(), synced.clone());
        std::thread::spawn(move || {
            let f = OpenOptions::new().write(true).open(&path).unwrap();
            for p in 1.. {
                for b in 0..nblocks {
                    if f.write_all_at(&block(b, p, bs as usize), b * bs).is_err() {
                        return;
                    }
                }
                if f.sync_data().is_err() {
                    return;
                }
                synced.store(p, Ordering::SeqCst);
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while synced.load(Ordering::SeqCst) < 3 {
        assert!(Instant::now() < deadline, "writer made no progress");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut d = v.daemon.take().unwrap();
    d.kill().unwrap();
    let st = d.wait().unwrap();
    let at_kill = synced.load(Ordering::SeqCst);
    let _ = Command::new("umount").arg("-l").arg(&v.mnt).output();
    let _ = Command::new("umount").arg("-l").arg(&v.cmnt).output();
    w.join().unwrap();
    println!("killed ({st}) after pass {at_kill} was fsync'd");
    v.fsck();
    v.mount("10");
    let data = std::fs::read(&path).unwrap();
    let frozen = std::fs::read(v.cmnt.join("f")).unwrap();
    for b in 0..nblocks {
        let got = &data[(b * bs) as usize..((b + 1) * bs) as usize];
        let ok = (at_kill..=at_kill + 1).any(|p| got == block(b, p, bs as usize).as_slice());
        assert!(
            ok,
            "block {b}: neither pass {at_kill} (synced) nor a later one"
        );
        let fz = &frozen[(b * bs) as usize..((b + 1) * bs) as usize];
        assert_eq!(fz, block(b, 0, bs as usize).as_slice(), "frozen block {b}");
    }
    let (st, log) = v.umount();
    assert!(st.success(), "daemon: {st}\n{log}");
    v.fsck();
}
